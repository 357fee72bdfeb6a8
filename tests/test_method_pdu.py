"""PDU (methods/primal_dual.py): the Lagrangian per micro-batch, the dual ascent in its three
schedules, warm-up, retain_eps: auto, the all-reduce, the saved state, and that it forgets."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import FORGET, RETAIN, encode, mean_prob

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.data.tokenize import collate
from unlearnflow.errors import ConfigError, DataError
from unlearnflow.methods import build_method
from unlearnflow.methods.base import TrainContext

CPU = torch.device("cpu")


def streams(tok):
    return {"forget": encode(tok, FORGET), "retain": encode(tok, RETAIN)}


def sub(tok, pairs, *, token_weight: float = 1.0, seq_weight: float = 1.0) -> dict[str, Any]:
    return collate(encode(tok, pairs), tok.pad_token_id) | {
        "token_weight": token_weight,
        "seq_weight": seq_weight,
    }


def micro_batch(tok, **weights: float) -> dict[str, dict[str, Any]]:
    """A fresh micro-batch object (the loop builds new dicts every step)."""
    return {"forget": sub(tok, FORGET, **weights), "retain": sub(tok, RETAIN)}


def ctx(
    *,
    steps_per_epoch: int = 1,
    all_reduce_mean: Callable[[float], float] = lambda x: x,
    batches: Callable[[str], Any] = lambda s: iter(()),
) -> TrainContext:
    return TrainContext(
        device=CPU,
        steps_per_epoch=steps_per_epoch,
        total_steps=100,
        grad_accum_steps=2,
        all_reduce_mean=all_reduce_mean,
        batches=batches,
    )


def pdu(**args: Any):
    return build_method("pdu", args)


def hand_stats(retain: float) -> dict[str, float]:
    return {"retain_loss": retain, "forget_loss": 0.0, "forget_nll": 0.0}


def drive(
    method, model, steps: Sequence[Sequence[dict]], *, evals: int = 1
) -> tuple[list[dict], list[list[float]]]:
    """The loop's protocol without an optimizer: per step the closure (``loss`` on every micro-batch)
    is evaluated ``evals`` times, as a zeroth-order optimizer would, then ``after_step`` gets the
    mean stats of the last evaluation. Returns the after_step rows and each evaluation's losses."""
    rows, losses = [], []
    for micro in steps:
        for _ in range(evals):
            stats: dict[str, float] = {}
            values = []
            for mb in micro:
                loss, st = method.loss(model, mb)
                values.append(float(loss.detach()))
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v / len(micro)
            losses.append(values)
        rows.append(method.after_step(stats))
    return rows, losses


# --- the dual variable -------------------------------------------------------------------------


def test_dual_ascent_by_hand_rises_then_falls_to_zero():
    """ε = 0.5, λ₀ = 1, η = 2, per step λ ← max(0, λ + 2·(L_r − 0.5)):
    L_r = 1, 1 (violated by 0.5) → λ = 2, 3; then L_r = 0 (holds by 0.5) → 2, 1, 0, and 0 again
    (the projection keeps λ at 0 while the constraint holds)."""
    m = pdu(retain_eps=0.5, dual_init=1.0, dual_lr=2.0, dual_warmup_epochs=0)
    m.setup(torch.nn.Identity(), ctx())
    lams = [m.after_step(hand_stats(r))["lambda"] for r in (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)]
    assert lams == [2.0, 3.0, 2.0, 1.0, 0.0, 0.0]


def test_epoch_update_uses_the_epoch_mean_at_the_boundary():
    """3 steps per epoch, ε = 1, λ₀ = 0, η = 1, L_r = 1, 2, 3 then 0, 0, 0: λ is held inside the epoch,
    then λ = max(0, 0 + (mean(1, 2, 3) − 1)) = 1 after step 3; after step 6, max(0, 1 + (0 − 1)) = 0."""
    m = pdu(retain_eps=1.0, dual_init=0.0, dual_lr=1.0, dual_update="epoch", dual_warmup_epochs=0)
    m.setup(torch.nn.Identity(), ctx(steps_per_epoch=3))
    lams = [m.after_step(hand_stats(r))["lambda"] for r in (1.0, 2.0, 3.0, 0.0, 0.0, 0.0)]
    assert lams == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("mode", ["step", "microbatch", "epoch"])
def test_the_dual_step_follows_the_all_reduced_retain_loss(mode, tiny_model, tiny_tokenizer):
    """A fake all-reduce that returns L_r + 1 (what other processes could make of it): with ε = 1,
    λ₀ = 1, η = 1, λ = 1 + ((L_r + 1) − 1) = 1 + L_r, whereas the local value would give λ = L_r.
    L_r is the retain NLL of the micro-batch, computed here with ``F.cross_entropy``. One step, one
    micro-batch, one step per epoch (so "epoch" updates after it too)."""
    m = pdu(retain_eps=1.0, dual_init=1.0, dual_lr=1.0, dual_update=mode, dual_warmup_epochs=0)
    m.setup(tiny_model, ctx(all_reduce_mean=lambda x: x + 1.0))
    mb = micro_batch(tiny_tokenizer)
    r = mb["retain"]
    with torch.no_grad():
        logits = tiny_model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        nll = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), r["labels"][:, 1:].flatten()))
    row = drive(m, tiny_model, [[mb]])[0][0]
    assert row["lambda"] == pytest.approx(1.0 + nll, rel=1e-5)
    assert row["retain_loss"] == pytest.approx(nll + 1.0, rel=1e-5)  # the logged value is the reduced one
    assert row["constraint"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("evals", [1, 2])
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("microbatch", [1.0, 2.0, 3.0, 4.0]),  # 2 updates per step
        ("step", [0.5, 1.0, 1.5, 2.0]),  # 1 per step
        ("epoch", [0.0, 0.5, 0.5, 1.0]),  # 1 per 2-step epoch
    ],
)
def test_each_schedule_updates_as_often_as_it_claims(mode, expected, evals, tiny_model, tiny_tokenizer):
    """Accumulation 2, 2 steps per epoch, 4 steps. The fake all-reduce returns 1 whatever it is given,
    so with ε = 0.5, λ₀ = 0, η = 1 every dual update adds exactly 1 − 0.5 = 0.5 and λ = 0.5 × (number
    of updates so far): microbatch 2/step, step 1/step, epoch 1 per 2 steps. With the closure
    evaluated twice per step the counts must not change, and the second evaluation must score every
    micro-batch with the λ of the first (the same losses), or a zeroth-order difference would be biased."""
    m = pdu(retain_eps=0.5, dual_init=0.0, dual_lr=1.0, dual_update=mode, dual_warmup_epochs=0)
    m.setup(tiny_model, ctx(steps_per_epoch=2, all_reduce_mean=lambda x: 1.0))
    steps = [[micro_batch(tiny_tokenizer), micro_batch(tiny_tokenizer)] for _ in range(4)]
    rows, losses = drive(m, tiny_model, steps, evals=evals)
    assert [r["lambda"] for r in rows] == expected
    assert [r["dual_updates"] for r in rows] == [2 * e for e in expected]
    if evals == 2:
        for first, again in zip(losses[::2], losses[1::2], strict=True):
            assert first == again


@pytest.mark.parametrize(
    ("mode", "warmup", "expected"),
    [
        ("step", 1.5, [1.0, 1.0, 1.0, 1.5, 2.0, 2.5]),  # held for ceil(1.5 × 2) = 3 steps
        ("microbatch", 1.5, [1.0, 1.0, 1.0, 2.0, 3.0, 4.0]),  # then 2 updates per step
        ("epoch", 2.0, [1.0, 1.0, 1.0, 1.5, 1.5, 2.0]),  # no update at the end of epoch 1
    ],
)
def test_warmup_holds_lambda(mode, warmup, expected, tiny_model, tiny_tokenizer):
    """2 steps per epoch, accumulation 2, reduced L_r ≡ 1, ε = 0.5, λ₀ = 1, η = 1: each update adds 0.5.
    step / microbatch: λ stays λ₀ for the first ceil(warmup × 2) steps. epoch with 2 warm-up epochs:
    the boundary after epoch 1 is skipped; the one that ends warm-up (after epoch 2) updates, as
    open-unlearning's on_epoch_end callback does (it enables updates, then updates)."""
    m = pdu(retain_eps=0.5, dual_init=1.0, dual_lr=1.0, dual_update=mode, dual_warmup_epochs=warmup)
    m.setup(tiny_model, ctx(steps_per_epoch=2, all_reduce_mean=lambda x: 1.0))
    steps = [[micro_batch(tiny_tokenizer), micro_batch(tiny_tokenizer)] for _ in range(6)]
    assert [r["lambda"] for r in drive(m, tiny_model, steps)[0]] == expected


def test_real_run_lambda_rises_while_violated_and_falls_once_it_holds(tiny_model, tiny_tokenizer):
    """A fresh tiny model has retain NLL ≈ ln V ≈ 5.8 > ε = 5: violated, so λ rises; the λ-weighted
    retain term then pulls L_r below 5 and λ falls back, here to 0 within 10 steps. Every logged λ
    must be max(0, λ_prev + η·(L_r − ε)) of the logged L_r (η = 1, λ₀ = 1), i.e. the dual step runs
    on the statistics that are logged."""
    tok = tiny_tokenizer
    cfg = TrainConfig(epochs=10, batch_size=2, lr=1e-2, max_grad_norm=None)
    method = pdu(retain_eps=5.0, dual_init=1.0, dual_lr=1.0, dual_warmup_epochs=0)
    rows = train.run(
        tiny_model, method, "adamw", streams(tok), cfg, pad_token_id=tok.pad_token_id, device=CPU
    ).rows
    lam = 1.0
    for row in rows:
        assert row["constraint"] == pytest.approx(row["retain_loss"] - 5.0)
        lam = max(0.0, lam + (row["retain_loss"] - 5.0))
        assert row["lambda"] == pytest.approx(lam)
    lams = [row["lambda"] for row in rows]
    assert rows[0]["constraint"] > 0 and lams[1] > lams[0] > 1.0  # rises while violated
    assert rows[-1]["constraint"] < 0 and lams[-1] == 0.0  # falls back to 0 once it holds
    # ε above the model's retain loss: satisfied from the start, λ = max(0, 3 + (L_r − 10)) = 0.
    method = pdu(retain_eps=10.0, dual_init=3.0, dual_lr=1.0, dual_warmup_epochs=0)
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, max_grad_norm=None)
    rows = train.run(
        tiny_model, method, "adamw", streams(tok), cfg, pad_token_id=tok.pad_token_id, device=CPU
    ).rows
    assert [row["lambda"] for row in rows] == [0.0, 0.0]


# --- ε, the objective, the reference model -----------------------------------------------------


def test_retain_eps_auto_is_the_token_mean_nll_of_the_start(tiny_model, tiny_tokenizer):
    """ε = (1 + tol)·NLL_r, NLL_r = Σ token NLL / Σ answer tokens over the whole retain stream, here by
    ``F.cross_entropy`` (mean over the shifted answer tokens) on one batch of both rows. ``batches``
    yields one row at a time, and the two answers differ in length, so a mean of batch means would
    differ (checked). With tol = 0.25 and an all-reduce that adds 1: ε = 1.25·(NLL_r + 1)."""
    tok = tiny_tokenizer
    rows = [sub(tok, [pair]) for pair in RETAIN]
    full = sub(tok, RETAIN)
    with torch.no_grad():
        logits = tiny_model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
        nll = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), full["labels"][:, 1:].flatten()))
        per_row = [float(F.cross_entropy(logits[i, :-1], full["labels"][i, 1:])) for i in range(len(RETAIN))]
    assert abs(sum(per_row) / 2 - nll) > 1e-3, "rows of equal length would not tell the two means apart"

    m = pdu(retain_eps="auto", retain_eps_tol=0.25)
    m.setup(tiny_model, ctx(batches=lambda s: iter(rows) if s == "retain" else iter(())))
    assert m.state_dict()["retain_eps"] == pytest.approx(1.25 * nll, rel=1e-5)
    m = pdu(retain_eps="auto", retain_eps_tol=0.25)
    m.setup(tiny_model, ctx(all_reduce_mean=lambda x: x + 1.0, batches=lambda s: iter(rows)))
    assert m.state_dict()["retain_eps"] == pytest.approx(1.25 * (nll + 1.0), rel=1e-5)


def _flatten_by_hand(
    logits: torch.Tensor, labels: torch.Tensor, shifted: bool, per_sequence: bool
) -> torch.Tensor:
    """(max_k z − mean_k z)² per scored position; per_sequence: row means, then their mean."""
    z, mask = (logits[:, :-1], labels[:, 1:] != -100) if shifted else (logits, labels != -100)
    per_pos = (z.max(-1).values - z.mean(-1)) ** 2
    if per_sequence:
        return torch.stack([per_pos[i][mask[i]].mean() for i in range(len(z))]).mean()
    return per_pos[mask].mean()


@pytest.mark.parametrize(
    ("alignment", "reduction"), [("shifted", "per_sequence"), ("unshifted", "per_token")]
)
def test_loss_is_the_lagrangian(alignment, reduction, sharp_model, tiny_tokenizer):
    """loss = γ·w·F + λ·(w_r·NLL_r − ε) with γ = 2, λ₀ = 3, ε = 0.5, F the flattening loss by hand
    (``_flatten_by_hand``) and NLL_r by ``F.cross_entropy``. The forget sub-batch carries
    token_weight 2 and seq_weight 3: per_sequence must use w = 3, per_token w = 2; the retain
    sub-batch carries token_weight 1.5 = w_r. The second case is open-unlearning's PDU loss."""
    tok = tiny_tokenizer
    m = pdu(gamma=2.0, dual_init=3.0, retain_eps=0.5, mask_alignment=alignment, reduction=reduction)
    m.setup(sharp_model, ctx())
    mb = {
        "forget": sub(tok, FORGET, token_weight=2.0, seq_weight=3.0),
        "retain": sub(tok, RETAIN, token_weight=1.5),
    }
    f, r = mb["forget"], mb["retain"]
    with torch.no_grad():
        f_logits = sharp_model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
        r_logits = sharp_model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
        flat = _flatten_by_hand(f_logits, f["labels"], alignment == "shifted", reduction == "per_sequence")
        nll = F.cross_entropy(r_logits[:, :-1].flatten(0, 1), r["labels"][:, 1:].flatten())
    w = 3.0 if reduction == "per_sequence" else 2.0
    loss, stats = m.loss(sharp_model, mb)
    torch.testing.assert_close(loss.detach(), 2.0 * w * flat + 3.0 * (1.5 * nll - 0.5))
    assert stats["forget_loss"] == pytest.approx(float(w * flat), rel=1e-5)
    assert stats["retain_loss"] == pytest.approx(float(1.5 * nll), rel=1e-5)
    assert stats["forget_nll"] > 0


def test_kl_retain_uses_a_frozen_reference(tiny_model, tiny_tokenizer):
    """retain_loss: kl: L_r = KL(π_ref ‖ π_θ) over the retain answer positions, π_ref a copy made in
    setup that training never moves; the loss after the model moved equals λ·(KL − ε) + γ·F with the
    KL written out: Σ_k p_ref·(log p_ref − log p_θ), averaged over the shifted answer positions."""
    tok = tiny_tokenizer
    m = pdu(retain_loss="kl", retain_eps=0.01, dual_init=2.0, dual_warmup_epochs=0)
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, max_grad_norm=None)
    start = copy.deepcopy(tiny_model.state_dict())
    train.run(tiny_model, m, "adamw", streams(tok), cfg, pad_token_id=tok.pad_token_id, device=CPU)
    assert m.ref is not None
    for name, p in m.ref.state_dict().items():
        assert torch.equal(p, start[name]), f"π_ref moved: {name}"
    assert any(not torch.equal(p, start[n]) for n, p in tiny_model.state_dict().items())

    mb = micro_batch(tok)
    f, r = mb["forget"], mb["retain"]
    lam = m.lam
    with torch.no_grad():
        logp = tiny_model(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits.log_softmax(-1)
        ref_logp = m.ref(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits.log_softmax(-1)
        mask = r["labels"][:, 1:] != -100
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)[:, :-1][mask].mean()
        f_logits = tiny_model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
        flat = _flatten_by_hand(f_logits, f["labels"], shifted=True, per_sequence=True)
    assert kl > 0
    loss, _ = m.loss(tiny_model, mb)
    torch.testing.assert_close(loss.detach(), flat + lam * (kl - 0.01))


def test_bad_args_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"retain_eps: auto needs retain_loss: nll"):
        pdu(retain_eps="auto", retain_loss="kl")
    for bad in (-0.1, "x", True, float("nan")):
        with pytest.raises(ConfigError, match=r"unlearn\.method_args\.pdu\.retain_eps"):
            pdu(retain_eps=bad)
    with pytest.raises(ConfigError, match=r"dual_update"):
        pdu(dual_update="batch")
    with pytest.raises(ConfigError, match=r"dual_lr"):
        pdu(dual_lr=-1.0)


# --- state and behaviour -----------------------------------------------------------------------


def test_state_dict_holds_lambda_and_resumes_mid_epoch():
    """Epoch mode, 3 steps per epoch, ε = 1, λ₀ = 0, η = 1, L_r = 3, 3, 0, 2: uninterrupted, λ = 1
    after epoch 1 (mean 2 − 1) and 1 still after step 4 (had the first two steps been lost,
    λ = max(0, 0 − 1) = 0). Resumed after step 2 from a JSON round trip of state_dict, the epoch's
    partial sum must carry over so the run ends in the same state; setup must keep the restored ε
    (auto would otherwise re-measure it, on a retain stream that is empty here, and fail)."""
    retain = (3.0, 3.0, 0.0, 2.0)
    whole = pdu(retain_eps=1.0, dual_init=0.0, dual_lr=1.0, dual_update="epoch", dual_warmup_epochs=0)
    whole.setup(torch.nn.Identity(), ctx(steps_per_epoch=3))
    for r in retain:
        whole.after_step(hand_stats(r))
    assert whole.state_dict()["lambda"] == 1.0 and whole.state_dict()["retain_eps"] == 1.0

    first = pdu(retain_eps=1.0, dual_init=0.0, dual_lr=1.0, dual_update="epoch", dual_warmup_epochs=0)
    first.setup(torch.nn.Identity(), ctx(steps_per_epoch=3))
    for r in retain[:2]:
        first.after_step(hand_stats(r))
    resumed = pdu(retain_eps="auto", dual_init=0.0, dual_lr=1.0, dual_update="epoch", dual_warmup_epochs=0)
    with pytest.raises(DataError, match="no answer tokens"):  # what setup would do without the state
        pdu(retain_eps="auto").setup(torch.nn.Identity(), ctx(steps_per_epoch=3))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed.setup(torch.nn.Identity(), ctx(steps_per_epoch=3))  # no retain stream: must not measure
    for r in retain[2:]:
        resumed.after_step(hand_stats(r))
    assert resumed.state_dict() == whole.state_dict()


@pytest.fixture(scope="module")
def learned(make_tiny_model, tiny_tokenizer):
    """The tiny model after it learned the forget and retain answers (as test_train's GA test)."""
    tok = tiny_tokenizer
    model = make_tiny_model()
    data = {"train": encode(tok, FORGET + RETAIN)}
    sft = TrainConfig(epochs=40, batch_size=4, lr=1e-2)
    train.run(model, build_method("sft"), "adamw", data, sft, pad_token_id=tok.pad_token_id, device=CPU)
    return model


def test_pdu_lowers_forget_prob_and_keeps_retain(learned, tiny_tokenizer):
    """Public TOFU duals (λ₀ 100, η 5) with ε auto and no warm-up, 5 steps at lr 5e-3: the forget
    answers' probability falls below half of what was learned while the constraint keeps the retain
    answers' above half of theirs; the parameters moved, and the saved state holds the last λ."""
    tok = tiny_tokenizer
    model = copy.deepcopy(learned)
    before_f, before_r = mean_prob(model, tok, FORGET), mean_prob(model, tok, RETAIN)
    assert before_f > 0.3, "the tiny model should first learn the forget answers"
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = pdu(retain_eps="auto", dual_warmup_epochs=0)
    cfg = TrainConfig(epochs=5, batch_size=2, lr=5e-3)
    result = train.run(model, method, "adamw", streams(tok), cfg, pad_token_id=tok.pad_token_id, device=CPU)
    assert mean_prob(model, tok, FORGET) < 0.5 * before_f
    assert mean_prob(model, tok, RETAIN) > 0.5 * before_r
    assert any(not torch.equal(params[n], p.detach()) for n, p in model.named_parameters())
    last = result.rows[-1]
    for key in ("lambda", "forget_loss", "retain_loss", "constraint", "retain_eps", "forget_nll"):
        assert key in last
    assert result.method_state["lambda"] == last["lambda"]
    assert result.method_state["retain_eps"] == last["retain_eps"]
    json.dumps(result.method_state)  # method_state.json
