"""RMU (methods/rmu.py): what trains, where the hidden states go, the loss's value, the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FORGET, RETAIN, encode, mean_prob

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.data.tokenize import collate
from unlearnflow.errors import ConfigError
from unlearnflow.methods import build_method
from unlearnflow.methods.base import TrainContext
from unlearnflow.methods.rmu import layer_output

CPU = torch.device("cpu")
# The fine-tuned tiny model's layer-1 outputs have norm ≈ 3 on answer tokens; c = 8 (≈ 2.7 ‖h‖)
# puts c·u clearly away from them, in the range WMDP's c / ‖h‖ ratios suggest (see the docs).
C = 8.0
RMU_STEPS = 6


def batch(tok, pairs, token_weight: float = 1.0):
    return collate(encode(tok, pairs), tok.pad_token_id) | {"token_weight": token_weight, "seq_weight": 1.0}


def streams(tok):
    return {"forget": encode(tok, FORGET), "retain": encode(tok, RETAIN)}


def ctx() -> TrainContext:
    return TrainContext(
        device=CPU,
        steps_per_epoch=1,
        total_steps=1,
        grad_accum_steps=1,
        all_reduce_mean=lambda x: x,
        batches=lambda stream: iter(()),
    )


def hidden(model, tok, pairs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, D) outputs of decoder layer ``layer`` at the K answer tokens (unshifted), by a hook."""
    b = batch(tok, pairs)
    with torch.no_grad():
        h, _ = layer_output(model, model.model.layers[layer], b)
    return h[b["labels"] != -100], b["labels"] != -100


def control(dim: int, c: float, seed: int = 0) -> torch.Tensor:
    """c·u, u = U[0,1)^D from a generator seeded with ``seed``, normalised (WMDP's draw)."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (c * u / u.norm()).float()


@pytest.fixture(scope="module")
def learned(make_tiny_model, tiny_tokenizer):
    """The tiny model after it learned the forget and retain answers (shared, copy before use)."""
    torch.manual_seed(0)
    model = make_tiny_model()
    cfg = TrainConfig(epochs=30, batch_size=4, lr=1e-2)
    data = {"train": encode(tiny_tokenizer, FORGET + RETAIN)}
    train.run(
        model, build_method("sft"), "adamw", data, cfg, pad_token_id=tiny_tokenizer.pad_token_id, device=CPU
    )
    return model.eval()


@pytest.fixture(scope="module")
def unlearned(learned, tiny_tokenizer):
    """One RMU run from ``learned``: (model before, model after, method, TrainResult).

    layer 1 (the last of the tiny model's 2), default train set = mlp.down_proj.weight of layers
    0 and 1. lr 3e-2 rather than WMDP's 5e-5: a few steps must move a 2k-weight matrix visibly.
    α = 10 rather than WMDP's 100: forget and retain rows share most tokens ("Question: … Answer:"
    and names) in a 2-layer model, so at α = 100 the retain term wins within 6 steps.
    """
    torch.manual_seed(0)
    before, model = copy.deepcopy(learned), copy.deepcopy(learned)
    method = build_method("rmu", {"layer": 1, "steering_coeff": C, "alpha": 10.0})
    cfg = TrainConfig(epochs=RMU_STEPS, batch_size=2, lr=3e-2, log_every=1)
    result = train.run(
        model,
        method,
        "adamw",
        streams(tiny_tokenizer),
        cfg,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=CPU,
    )
    assert result.steps == RMU_STEPS  # 2 forget rows, batch 2: one step per epoch
    return before, model.eval(), method, result


def test_only_the_chosen_parameters_move(unlearned):
    before, after, _, _ = unlearned
    chosen = {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert {n for n, p in after.named_parameters() if p.requires_grad} == chosen
    old = dict(before.named_parameters())
    for n, p in after.named_parameters():
        if n in chosen:
            assert not torch.equal(old[n], p), f"{n} did not move"
        else:
            assert torch.equal(old[n], p), f"frozen {n} moved"


def test_train_layers_and_train_params_choose_what_trains(tiny_model):
    """train_layers [1] with train_params '.*' trains all of layer 1 and nothing else (the
    open-unlearning-like choice); the count is the sum of their sizes."""
    method = build_method("rmu", {"layer": 1, "train_layers": [1], "train_params": ".*"})
    method.setup(tiny_model, ctx())
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tiny_model.named_parameters() if n.startswith("model.layers.1.")}
    assert method.trainable_params == sum(p.numel() for p in tiny_model.model.layers[1].parameters())


def test_forget_hidden_states_move_toward_the_control_vector(unlearned, tiny_tokenizer):
    """Mean ‖h_1 − c·u‖ over forget answer tokens falls below 0.8 of its start (measured: 9.0 →
    6.2): the trained down_proj rows add a component along u and shrink the rest."""
    before, after, method, _ = unlearned
    cu = control(before.config.hidden_size, C)
    torch.testing.assert_close(method.control, cu)  # the draw is WMDP's, from control_seed
    d0 = (hidden(before, tiny_tokenizer, FORGET, 1)[0] - cu).norm(dim=-1).mean()
    d1 = (hidden(after, tiny_tokenizer, FORGET, 1)[0] - cu).norm(dim=-1).mean()
    assert d1 < 0.8 * d0, f"forget distance to c·u {float(d0):.3f} → {float(d1):.3f}"


def test_retain_hidden_states_stay_close_to_the_reference(unlearned, tiny_tokenizer):
    """The retain tokens' layer-1 states move far less than the forget tokens' do:
    mean ‖h_r − h_r,ref‖ < 0.5 · mean ‖h_f − h_f,ref‖, both against the model before RMU
    (measured 0.26; without the retain term the two move alike, ratio ≈ 0.9)."""
    before, after, _, _ = unlearned
    moved_f = hidden(after, tiny_tokenizer, FORGET, 1)[0] - hidden(before, tiny_tokenizer, FORGET, 1)[0]
    moved_r = hidden(after, tiny_tokenizer, RETAIN, 1)[0] - hidden(before, tiny_tokenizer, RETAIN, 1)[0]
    f, r = moved_f.norm(dim=-1).mean(), moved_r.norm(dim=-1).mean()
    assert r < 0.5 * f, f"retain moved {float(r):.3f}, forget {float(f):.3f}"


def test_forget_probability_falls_retain_holds(unlearned, tiny_tokenizer):
    """Behaviour. RMU never touches the likelihood: it scrambles layer-1 states of forget tokens and
    the answer probability falls only as a side effect, so the bar is modest (below half in 6
    steps; measured 0.70 → 0.03), while the retain answers keep ≥ 0.8 of theirs (measured 0.87)."""
    before, after, _, _ = unlearned
    pf0, pf1 = mean_prob(before, tiny_tokenizer, FORGET), mean_prob(after, tiny_tokenizer, FORGET)
    pr0, pr1 = mean_prob(before, tiny_tokenizer, RETAIN), mean_prob(after, tiny_tokenizer, RETAIN)
    assert pf0 > 0.5, "the tiny model should first learn the forget answers"
    assert pf1 < 0.5 * pf0, f"forget prob {pf0:.3f} → {pf1:.3f}"
    assert pr1 > 0.8 * pr0, f"retain prob {pr0:.3f} → {pr1:.3f}"


def test_reference_is_never_updated(unlearned):
    before, _, method, _ = unlearned
    for (n, p), q in zip(method.ref.named_parameters(), before.parameters(), strict=True):
        assert not p.requires_grad and torch.equal(p, q), f"reference {n} changed"


def test_trainable_params_logged_once(unlearned):
    """2 down_proj matrices of the tiny model, each (hidden 32) × (intermediate 64) = 2048."""
    _, _, _, result = unlearned
    assert result.rows[0]["trainable_params"] == 2 * 32 * 64
    assert all("trainable_params" not in row for row in result.rows[1:])
    assert {"forget_distance", "retain_distance", "forget_nll"} <= set(result.rows[0])


@pytest.mark.parametrize(("reduction", "positions"), [("mean", "answer"), ("sum", "answer"), ("mean", "all")])
def test_loss_equals_the_formula_on_hidden_states(make_tiny_model, tiny_tokenizer, reduction, positions):
    """L = γ·mean_t ‖h_t − c·u‖² + α·mean_t ‖h_t − h_ref,t‖² (÷ D for "mean"), t over answer tokens
    (labels ≠ -100, unshifted) or, for positions="all", every non-padding token (attention_mask).

    Computed here from ``output_hidden_states``: hidden_states[ℓ + 1] is decoder layer ℓ's output
    for ℓ = 0 of the 2-layer model (not for the last layer: HF puts the final-normed state there).
    The model is perturbed after setup, so the reference differs and the retain term is not 0.
    γ = 2, α = 3, c = 4 so a swapped weight or a missing c shows.
    """
    tok, model = tiny_tokenizer, make_tiny_model()
    args = {"layer": 0, "steering_coeff": 4.0, "gamma": 2.0, "alpha": 3.0, "hidden_reduction": reduction}
    args["positions"] = positions
    method = build_method("rmu", args)
    method.setup(model, ctx())
    with torch.no_grad():
        w = model.model.embed_tokens.weight  # any change works: it only has to differ from ref
        w.add_(0.1 * torch.randn_like(w))
    f, r = batch(tok, FORGET), batch(tok, RETAIN)
    loss, stats = method.loss(model, {"forget": f, "retain": r})

    def h1(m, b):
        with torch.no_grad():
            out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        mask = b["labels"] != -100 if positions == "answer" else b["attention_mask"].bool()
        return out.hidden_states[1][mask]

    d = model.config.hidden_size
    div = d if reduction == "mean" else 1
    cu = control(d, 4.0)
    forget = ((h1(model, f) - cu) ** 2).sum(-1).mean() / div
    retain = ((h1(model, r) - h1(method.ref, r)) ** 2).sum(-1).mean() / div
    assert float(retain) > 0.01 * float(forget)  # the α term counts in the total
    torch.testing.assert_close(loss.detach(), 2.0 * forget + 3.0 * retain, rtol=1e-5, atol=1e-6)
    assert stats["forget_distance"] == pytest.approx(float(forget), rel=1e-5)
    assert stats["retain_distance"] == pytest.approx(float(retain), rel=1e-5)


def test_hook_reads_the_layer_output_not_the_final_norm(tiny_model, tiny_tokenizer):
    """For the last layer, HF's hidden_states[-1] = final_norm(layer output): the hook's value is
    the pre-norm one, which the final norm maps onto hidden_states[-1]."""
    b = batch(tiny_tokenizer, FORGET)
    with torch.no_grad():
        h, out = layer_output(tiny_model, tiny_model.model.layers[-1], b)
        full = tiny_model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        )
        torch.testing.assert_close(tiny_model.model.norm(h), full.hidden_states[-1])
        assert not torch.allclose(h, full.hidden_states[-1])
        torch.testing.assert_close(out.logits, full.logits)
        stopped, none = layer_output(tiny_model, tiny_model.model.layers[0], b, stop=True)
    assert none is None
    torch.testing.assert_close(stopped, full.hidden_states[1])


def test_bad_layer_index_is_one_line(tiny_model):
    method = build_method("rmu", {"layer": 5})
    with pytest.raises(
        ConfigError, match=r"rmu.layer=5 is out of range: LlamaForCausalLM has 2 decoder layers"
    ) as e:
        method.setup(tiny_model, ctx())
    assert "\n" not in str(e.value)


def test_unknown_architecture_is_one_line():
    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(ConfigError, match="cannot find the decoder layers of Mlp") as e:
        build_method("rmu", {"layer": 0}).setup(Mlp(), ctx())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"layer": 1, "train_layers": [2]}, r"train_layers=\[2\] must be .* \[0, layer=1\]"),
        ({"layer": 1, "train_layers": []}, "train_layers"),
        ({"train_params": "mlp.(down"}, "not a regex"),
        ({"steering_coeff": 0}, "steering_coeff"),
        ({"hidden_reduction": "max"}, "hidden_reduction"),
        ({"positions": "prompt"}, "positions"),
    ],
)
def test_bad_args_are_one_line_config_errors(args, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_method("rmu", args)
    assert "\n" not in str(e.value)


def test_train_params_matching_nothing_is_a_config_error(tiny_model):
    with pytest.raises(
        ConfigError,
        match=r"rmu.train_params=.*nope.* matches no parameter of layers \[0, 1\] .*mlp.down_proj.weight",
    ):
        build_method("rmu", {"layer": 1, "train_params": r"mlp\.nope"}).setup(tiny_model, ctx())


def test_default_train_layers_are_wmdps():
    """WMDP trains layers ℓ−2, ℓ−1, ℓ; clipped at 0 for small ℓ."""
    assert build_method("rmu", {"layer": 7}).args.trained_layers() == [5, 6, 7]
    assert build_method("rmu", {"layer": 1}).args.trained_layers() == [0, 1]
    assert build_method("rmu", {"layer": 0}).args.trained_layers() == [0]
