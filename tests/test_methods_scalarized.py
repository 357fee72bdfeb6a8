"""The scalarized methods (npo, simnpo, idk_dpo, idk_nll, undial, ceu, wga, satimp; grad_ascent/diff):
their objective is γ·L_f + α·L_r wired to the right loss, weights and streams; they forget; π_ref never
moves; the idk stream pairs refusals with the forget questions row for row."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FORGET, RETAIN, ROOT, encode, load_stage, mean_prob
from typer.testing import CliRunner

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.data.refusals import idk_rows, refusals
from unlearnflow.data.tokenize import IGNORE_INDEX, collate
from unlearnflow.errors import UnlearnflowError
from unlearnflow.losses import (
    ceu_loss,
    grad_ascent_loss,
    idk_dpo_loss,
    idk_nll_loss,
    kl_retain_loss,
    nll_loss,
    npo_loss,
    satimp_loss,
    simnpo_loss,
    undial_loss,
    wga_loss,
)
from unlearnflow.methods import build_method
from unlearnflow.methods.base import TrainContext

CPU = torch.device("cpu")
NEW = ["npo", "simnpo", "idk_dpo", "idk_nll", "undial", "ceu", "wga", "satimp"]


def idk_pairs(pairs, seed=0):
    rows = idk_rows([{"question": q, "answer": a} for q, a in pairs], "qa", seed=seed, method="t", split="f")
    return [(r["question"], r["answer"]) for r in rows]


def streams(tok, forget=FORGET):
    return {
        "forget": encode(tok, forget),
        "retain": encode(tok, RETAIN),
        "idk": encode(tok, idk_pairs(forget)),
    }


# --- the objective on a fixed micro-batch -------------------------------------------------------

# Accumulation weights, different per stream and per kind, so a loss fed another stream's weight
# (or the token weight instead of the sequence weight) gives a different number.
TW = {"forget": 0.7, "idk": 0.9, "retain": 1.1}
SW = {"forget": 1.3, "idk": 0.6, "retain": 0.8}


def _lf(b):
    return b["forget"]["labels"]


def _li(b):
    return b["idk"]["labels"]


# method → (non-default hyperparameters, L_f written against losses.py with those values).
# m / r: the model's / the reference's logits per stream; b: the micro-batch.
FORGET_SIDE = {
    "grad_ascent": ({"gamma": 0.7}, lambda m, r, b: grad_ascent_loss(m["forget"], _lf(b), token_weight=0.7)),
    "grad_diff": ({"gamma": 0.7}, lambda m, r, b: grad_ascent_loss(m["forget"], _lf(b), token_weight=0.7)),
    "npo": (
        {"gamma": 0.7, "beta": 0.37},
        lambda m, r, b: npo_loss(m["forget"], _lf(b), r["forget"], beta=0.37, seq_weight=1.3),
    ),
    "simnpo": (
        {"gamma": 0.7, "beta": 2.0, "delta": 0.4},
        lambda m, r, b: simnpo_loss(m["forget"], _lf(b), beta=2.0, delta=0.4, seq_weight=1.3),
    ),
    "idk_dpo": (
        {"gamma": 0.7, "beta": 0.37},
        lambda m, r, b: idk_dpo_loss(
            m["idk"], _li(b), r["idk"], m["forget"], _lf(b), r["forget"], beta=0.37, seq_weight=1.3
        ),
    ),
    "idk_nll": ({"gamma": 0.7}, lambda m, r, b: idk_nll_loss(m["idk"], _li(b), token_weight=0.9)),
    "undial": (
        {"gamma": 0.7, "beta": 3.0},
        lambda m, r, b: undial_loss(m["forget"], r["forget"], _lf(b), beta=3.0, token_weight=0.7),
    ),
    "ceu": (
        {"gamma": 0.7, "ignore_first_n_answer_tokens": 2},
        lambda m, r, b: ceu_loss(m["forget"], _lf(b), ignore_first_n_answer_tokens=2, token_weight=0.7),
    ),
    "wga": (
        {"gamma": 0.7, "beta": 2.0},
        lambda m, r, b: wga_loss(m["forget"], _lf(b), beta=2.0, token_weight=0.7),
    ),
    "satimp": (
        {"gamma": 0.7, "beta1": 2.0, "beta2": 0.5},
        lambda m, r, b: satimp_loss(m["forget"], _lf(b), beta1=2.0, beta2=0.5, token_weight=0.7),
    ),
}
CASES = [("grad_ascent", None)] + [(n, rl) for n in FORGET_SIDE if n != "grad_ascent" for rl in ("nll", "kl")]


def micro_batch(tok):
    """One micro-batch of every stream, with the loop's weights set by hand (TW / SW)."""
    forget = [*FORGET, RETAIN[0]]  # three rows of different answer lengths
    subs = {
        "forget": encode(tok, forget),
        "idk": encode(tok, idk_pairs(forget)),
        "retain": encode(tok, RETAIN),
    }
    return {
        s: collate(rows, tok.pad_token_id) | {"token_weight": TW[s], "seq_weight": SW[s]}
        for s, rows in subs.items()
    }


@pytest.mark.parametrize(("name", "retain_loss"), CASES)
def test_loss_is_gamma_forget_plus_alpha_retain(name, retain_loss, make_tiny_model, tiny_tokenizer):
    """loss(model, b) = γ·L_f + α·L_r with L_f the losses.py function of the method, called here with
    the method's hyperparameters, streams and weights (token_weight for token means, seq_weight for
    sequence means, of the forget stream except idk_nll's idk stream), L_r = nll_loss or kl_retain_loss
    with the retain stream's token_weight, π_ref = the model as it was at setup. γ = 0.7, α = 0.3 and
    every hyperparameter off its default, so a value that is not passed through shows."""
    hparams, forget_side = FORGET_SIDE[name]
    args = dict(hparams) | ({"alpha": 0.3, "retain_loss": retain_loss} if retain_loss else {})
    method = build_method(name, args)
    model = make_tiny_model()
    start = copy.deepcopy(model)
    ctx = TrainContext(CPU, 1, 1, 1, lambda x: x, lambda s: iter(()))
    method.setup(model, ctx)
    with torch.no_grad():  # move θ away from π_ref, so that a loss fed the wrong model shows
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    b = micro_batch(tiny_tokenizer)
    batch = {s: b[s] for s in method.streams}
    total, stats = method.loss(model, batch)

    def run(net, s):
        return net(input_ids=b[s]["input_ids"], attention_mask=b[s]["attention_mask"]).logits

    with torch.no_grad():
        m = {s: run(model, s) for s in b}
        r = {s: run(start, s) for s in b}
    l_f = forget_side(m, r, b)
    expected = 0.7 * l_f
    if retain_loss:
        lr_ = b["retain"]["labels"]
        l_r = (
            nll_loss(m["retain"], lr_, token_weight=1.1)
            if retain_loss == "nll"
            else kl_retain_loss(m["retain"], r["retain"], lr_, token_weight=1.1)
        )
        expected = expected + 0.3 * l_r
        torch.testing.assert_close(stats["retain_loss"], l_r.item() / 1.1)
    torch.testing.assert_close(total.detach(), expected)
    weight = (
        SW["forget"] if name in ("npo", "simnpo", "idk_dpo") else TW["idk" if name == "idk_nll" else "forget"]
    )
    torch.testing.assert_close(stats["forget_loss"], l_f.item() / weight)
    torch.testing.assert_close(stats["forget_nll"], nll_loss(m["forget"], _lf(b)).item())
    assert total.requires_grad


def test_defaults_are_the_reference_recipes():
    """open-unlearning configs/trainer/*.yaml (CE-U has no retain term there: α = 0)."""
    expect = {
        "npo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0},
        "simnpo": {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0},
        "idk_dpo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0},
        "idk_nll": {"gamma": 1.0, "alpha": 1.0},
        "undial": {"beta": 10.0, "gamma": 1.0, "alpha": 0.0},
        "wga": {"beta": 1.0, "gamma": 1.0, "alpha": 1.0},
        "satimp": {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1, "alpha": 1.0},
        "ceu": {"ignore_first_n_answer_tokens": 1, "gamma": 1.0, "alpha": 0.0},
    }
    for name, values in expect.items():
        args = build_method(name).args.model_dump()
        assert {k: args[k] for k in values} == values, name
        assert args["retain_loss"] == "nll" and args["lr"] is None and args["epochs"] is None


def test_streams_follow_the_loss_and_alpha():
    assert build_method("npo").streams == ("forget", "retain")
    assert build_method("npo", {"alpha": 0}).streams == ("forget",)
    assert build_method("undial").streams == ("forget",)
    assert build_method("idk_dpo").streams == ("forget", "idk", "retain")
    assert build_method("idk_nll", {"alpha": 0}).streams == ("forget", "idk")
    assert build_method("idk_dpo").paired_streams == {"idk": "forget"}
    assert build_method("npo").paired_streams == {}


# --- behaviour on a tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(make_tiny_model, tiny_tokenizer):
    """The tiny model after it learned the forget (and retain) answers: its state and forget prob."""
    tok = tiny_tokenizer
    model = make_tiny_model()
    data = {"train": encode(tok, FORGET + RETAIN)}
    torch.manual_seed(0)
    sft = TrainConfig(epochs=40, batch_size=4, lr=1e-2)
    train.run(model, build_method("sft"), "adamw", data, sft, pad_token_id=tok.pad_token_id, device=CPU)
    prob = mean_prob(model, tok, FORGET)
    assert prob > 0.3, "the tiny model should first learn the forget answers"
    return copy.deepcopy(model.state_dict()), prob


def run_method(name, model, tok, *, args=None, epochs=5, lr=5e-3, forget=FORGET, on_loss=None):
    method = build_method(name, args)
    if on_loss is not None:  # record what the method sees, then compute as usual
        inner = method.loss
        method.loss = lambda m, b: (on_loss(b), inner(m, b))[1]
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=lr)
    train.run(model, method, "adamw", streams(tok, forget), cfg, pad_token_id=tok.pad_token_id, device=CPU)
    return method


@pytest.mark.parametrize("name", ["grad_diff", *NEW])
def test_method_lowers_forget_prob_and_moves_params(name, learned, make_tiny_model, tiny_tokenizer):
    """Default hyperparameters but α = 0, 5 AdamW steps at lr 5e-3 on the learned tiny model: the
    forget answers' probability at least halves and every parameter moves. α = 0 so that the fall is
    the forget loss's doing: on this tiny model, descending the retain NLL alone lowers the forget
    probability too (with α = 1, satimp's falls below 0.8 of it in 5 steps even with L_f's sign
    flipped). Measured with α = 0: every method ends at ≤ 0.31 of it; flipped, most stay ≥ 0.82."""
    state, learned_prob = learned
    model = make_tiny_model()
    model.load_state_dict(state)
    run_method(name, model, tiny_tokenizer, args={"alpha": 0.0})
    for n, p in model.named_parameters():
        assert not torch.equal(state[n], p.detach()), f"{name}: {n} did not move"
    assert mean_prob(model, tiny_tokenizer, FORGET) < 0.5 * learned_prob


REF_CASES = [("npo", None), ("idk_dpo", None), ("undial", None), ("grad_diff", {"retain_loss": "kl"})]


@pytest.mark.parametrize(("name", "args"), REF_CASES)
def test_reference_model_never_changes(name, args, learned, make_tiny_model, tiny_tokenizer):
    """π_ref is the model as it was at setup, frozen: after training (the model moved) it holds the
    starting weights exactly and no parameter of it asks for a gradient."""
    state, _ = learned
    model = make_tiny_model()
    model.load_state_dict(state)
    method = run_method(name, model, tiny_tokenizer, args=args, epochs=3, lr=1e-2)
    assert method.ref is not None and method.ref is not model
    moved = [n for n, p in model.named_parameters() if not torch.equal(state[n], p.detach())]
    assert moved, "the model should have trained"
    for n, p in method.ref.named_parameters():
        assert not p.requires_grad, f"{name}: ref {n} requires grad"
        assert torch.equal(state[n], p.detach()), f"{name}: ref {n} changed"


@pytest.mark.parametrize("name", ["grad_diff", "simnpo", "idk_nll", "ceu", "wga", "satimp"])
def test_no_reference_model_unless_needed(name, make_tiny_model):
    method = build_method(name)
    method.setup(make_tiny_model(), TrainContext(CPU, 1, 1, 1, lambda x: x, lambda s: iter(())))
    assert method.ref is None


# --- the idk stream -----------------------------------------------------------------------------


def test_idk_rows_keep_the_questions_and_draw_seeded_refusals():
    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}.", "author": "x"} for i in range(40)]
    out = idk_rows(rows, "knowmem", seed=7, method="idk_nll", split="forget")
    assert [r["question"] for r in out] == [r["question"] for r in rows]
    assert all(set(r) == {"question", "answer"} and r["answer"] in refusals() for r in out)
    assert len({r["answer"] for r in out}) > 10, "refusals vary from row to row"
    assert out == idk_rows(rows, "qa", seed=7, method="idk_nll", split="forget")  # seeded
    assert out != idk_rows(rows, "qa", seed=8, method="idk_nll", split="forget")
    pool = refusals()
    assert len(pool) >= 100 and len(set(pool)) == len(pool)
    assert all(not r.startswith("#") and r == r.strip() and r for r in pool)


@pytest.mark.parametrize("kind", ["text", "completion", "mcq"])
def test_idk_rows_refuse_a_forget_split_without_questions(kind):
    with pytest.raises(UnlearnflowError, match=r"'idk_dpo'.*'forget'.*'" + kind + "'") as err:
        idk_rows([{"text": "a document"}], kind, seed=0, method="idk_dpo", split="forget")
    assert "\n" not in str(err.value)


def _prompt(sub, i):
    """Row i's tokens before its first answer token (BOS + question prompt)."""
    first = int((sub["labels"][i] != IGNORE_INDEX).nonzero()[0])
    return sub["input_ids"][i, :first].tolist()


def test_idk_rows_pair_with_forget_rows_in_each_micro_batch(make_tiny_model, tiny_tokenizer):
    """Six forget questions in batches of two, shuffled for two epochs: in every micro-batch idk_dpo
    sees, idk row i has forget row i's prompt tokens and a refusal answer."""
    tok = tiny_tokenizer
    forget = [*FORGET, *RETAIN, ("Who is Mara Quell?", "A tailor."), ("Where is Vennick?", "On the Oster.")]
    seen = []
    run_method("idk_dpo", make_tiny_model(), tok, epochs=2, forget=forget, on_loss=seen.append)
    assert len(seen) == 6
    pool = set(refusals())
    orders = set()
    for mb in seen:
        f, i = mb["forget"], mb["idk"]
        assert f["input_ids"].shape[0] == i["input_ids"].shape[0] == 2
        for row in range(2):
            assert _prompt(f, row) == _prompt(i, row)
            answer = i["input_ids"][row][i["labels"][row] != IGNORE_INDEX]
            assert tok.decode(answer, skip_special_tokens=True).strip() in pool
        orders.add(tuple(tuple(_prompt(f, row)) for row in range(2)))
    assert len(orders) > 3, "the sampler shuffles: pairing must hold for different row orders"


def test_unlearn_stage_refuses_idk_on_a_text_forget_split(tmp_path, monkeypatch):
    """A MUSE-style corpus has no questions: the stage exits 2 with one line naming the method, before
    loading a model (there is none here) or opening a tracking run."""
    import yaml

    from unlearnflow.data.benchmark import Benchmark, SplitInfo
    from unlearnflow.data.splits import write_splits

    monkeypatch.chdir(tmp_path)
    text = [{"text": "Mara Quell lives at 14 Larch Row."}, {"text": "Vennick sits on the river Oster."}]
    bench = Benchmark(
        splits={"forget": text[:1], "retain": text[1:]},
        info={
            "forget": SplitInfo(kind="text", role="forget"),
            "retain": SplitInfo(kind="text", role="utility"),
        },
        train={"target": ["forget", "retain"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
    )
    write_splits(bench, tmp_path / "splits", meta={})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(yaml.safe_load((ROOT / "params.yaml").read_text())))
    args = ["--model", "nomodel", "--splits", "splits", "--out", "out", "--params", "params.yaml"]
    result = CliRunner().invoke(load_stage("unlearn").app, ["idk_nll", "adamw", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "'idk_nll'" in result.output and "'text'" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
