"""The loop's optimizer seam (optim/seam.py): closures called several times, clipping once, ZO steps."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from helpers import FORGET, RETAIN, encode

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.errors import ConfigError
from unlearnflow.methods import build_method
from unlearnflow.optim import OPTIMIZERS, OptimizerSpec, check_pairing

CPU = torch.device("cpu")


def streams(tok):
    enc_f, enc_r = encode(tok, FORGET), encode(tok, RETAIN)
    return {"train": enc_f + enc_r, "forget": enc_f, "retain": enc_r}


def run_with(optimizer_cls, model, tok, monkeypatch, *, method="grad_diff", **cfg_kw):
    """train.run with ``optimizer_cls(params, lr)`` in place of the registry's optimizer."""
    real = train.build_optimizer

    def build(name, model, **kw):
        _, spec = real("sgd", model, lr=kw["lr"], weight_decay=0.0)
        return optimizer_cls(model.parameters(), lr=kw["lr"]), spec

    monkeypatch.setattr(train, "build_optimizer", build)
    cfg = TrainConfig(**({"epochs": 1, "batch_size": 5, "lr": 0.1, "max_grad_norm": None} | cfg_kw))
    return train.run(
        model, build_method(method), "sgd", streams(tok), cfg, pad_token_id=tok.pad_token_id, device=CPU
    )


class TwiceSGD(torch.optim.SGD):
    """Builds its gradient from two closure calls (the second must not add to the first)."""

    calls = 0

    def gradient(self, closure) -> None:
        closure()
        closure()
        TwiceSGD.calls += 2


def test_a_closure_called_twice_gives_one_evaluations_gradient(make_tiny_model, tiny_tokenizer, monkeypatch):
    """Plain SGD calls the closure once; an optimizer calling it twice on the same weights must end
    with the same gradient (each call zeroes .grad first), so the two runs end bit for bit equal.
    Without the zeroing the second run would step with 2·g."""
    once, twice = make_tiny_model(), make_tiny_model()
    run_with(torch.optim.SGD, once, tiny_tokenizer, monkeypatch)
    TwiceSGD.calls = 0
    result = run_with(TwiceSGD, twice, tiny_tokenizer, monkeypatch)
    assert TwiceSGD.calls == 2 * result.steps
    for p, q in zip(once.parameters(), twice.parameters(), strict=True):
        assert torch.equal(p, q)


def test_clipping_happens_once_on_the_gradient_used(make_tiny_model, tiny_tokenizer, monkeypatch):
    """max_grad_norm c: the logged grad_norm is ‖g‖ of one evaluation (before clipping) and the SGD
    update is lr·g·c/‖g‖. Clipping inside each closure call would give the same numbers only by
    accident; clipping twice would not change them either, so the test also checks the update's
    norm is exactly lr·c (one clip to c, not a re-scaling of the sum)."""
    base, twin = make_tiny_model(), make_tiny_model()
    free = run_with(torch.optim.SGD, base, tiny_tokenizer, monkeypatch)
    before = [p.detach().clone() for p in twin.parameters()]
    clipped = run_with(TwiceSGD, twin, tiny_tokenizer, monkeypatch, max_grad_norm=1e-3)
    assert clipped.rows[0]["grad_norm"] == pytest.approx(free.rows[0]["grad_norm"], rel=1e-6)
    assert clipped.rows[0]["grad_norm"] > 1e-3
    moved = math.sqrt(
        sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(twin.parameters(), before, strict=True))
    )
    assert moved == pytest.approx(0.1 * 1e-3, rel=1e-4)


class FakeZO(torch.optim.Optimizer):
    """A gradient-free step: evaluates the closure at θ ± μe₀ (first entry of the first tensor),
    checks it runs without gradients, and applies θ₀ ← θ₀ − lr·(L+ − L−)/2μ."""

    seen: ClassVar[list] = []

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def is_zeroth_order_step(self, step: int) -> bool:
        return True

    def step(self, closure=None):
        assert not torch.is_grad_enabled()
        p, mu = self.param_groups[0]["params"][0], 1e-2
        flat = p.data.view(-1)
        start = flat[0].item()
        flat[0] = start + mu
        plus = closure()
        flat[0] = start - mu
        minus = closure()
        flat[0] = start - self.param_groups[0]["lr"] * float(plus - minus) / (2 * mu)
        FakeZO.seen.append((float(plus), float(minus), plus.grad_fn))
        closure.report(grad_norm=abs(float(plus - minus)) / (2 * mu))
        return (plus + minus) / 2


def test_a_zeroth_order_step_has_no_grad_and_logs_the_mean(make_tiny_model, tiny_tokenizer, monkeypatch):
    """A ZO step runs under no_grad: no .grad, no graph; the logged loss is the mean of the two
    evaluations (the loss at θ to O(μ²)), not the last one; the optimizer's reported grad_norm is
    the row's; the learning-rate schedule still applies; only the entry it moves changes."""
    model = make_tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    FakeZO.seen = []
    result = run_with(FakeZO, model, tiny_tokenizer, monkeypatch, log_every=1)
    assert len(FakeZO.seen) == result.steps
    for row, (plus, minus, fn) in zip(result.rows, FakeZO.seen, strict=True):
        assert fn is None
        assert row["loss"] == pytest.approx((plus + minus) / 2, rel=1e-6)
        assert row["grad_norm"] == pytest.approx(abs(plus - minus) / 2e-2, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert changed[0] and not any(changed[1:])


def test_sampled_backward_is_the_gnb_probe(make_tiny_model, tiny_tokenizer, monkeypatch):
    """The Gauss-Newton-Bartlett probe: a gradient over the answer tokens of every stream, labels
    drawn from the model's softmax with a (seed, step) generator: the same step gives the same
    gradient twice, the token count is the answer tokens of forget + retain, and the gradient is
    not the one of the true labels."""
    probes = []

    class Probe(torch.optim.SGD):
        def gradient(self, closure) -> None:
            n = closure.sampled_backward()
            g1 = [p.grad.clone() for p in self.param_groups[0]["params"]]
            assert closure.sampled_backward() == n
            g2 = [p.grad.clone() for p in self.param_groups[0]["params"]]
            closure()
            g3 = [p.grad.clone() for p in self.param_groups[0]["params"]]
            probes.append((n, g1, g2, g3))

    run_with(Probe, make_tiny_model(), tiny_tokenizer, monkeypatch)
    n, g1, g2, g3 = probes[0]
    tokens = sum(int((collated["labels"][:, 1:] != -100).sum()) for collated in _batches(tiny_tokenizer))
    assert n == tokens
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert any(not torch.allclose(a, c) for a, c in zip(g1, g3, strict=True))


def _batches(tok):
    from unlearnflow.data.tokenize import collate

    return [collate(encode(tok, FORGET), tok.pad_token_id), collate(encode(tok, RETAIN), tok.pad_token_id)]


def test_a_pairing_that_cannot_be_defined_is_refused_in_one_line(monkeypatch):
    """A method that needs gradients (ofmu) with an optimizer that has gradient-free steps: a
    ConfigError naming both; with a first-order optimizer it passes."""
    monkeypatch.setitem(
        OPTIMIZERS._items, "fake_zo", OptimizerSpec(OPTIMIZERS.get("sgd").Args, None, zeroth_order=True)
    )
    with pytest.raises(ConfigError, match=r"'ofmu'.*'fake_zo'") as err:
        check_pairing("ofmu", "fake_zo", needs_grad=True)
    assert "\n" not in str(err.value)
    check_pairing("ofmu", "adamw", needs_grad=True)
    check_pairing("grad_diff", "fake_zo", needs_grad=False)


def _pairings():
    from unlearnflow.matrix import NOT_UNLEARNING
    from unlearnflow.methods import METHODS

    return [(m, o) for m in sorted(set(METHODS) - NOT_UNLEARNING) for o in sorted(OPTIMIZERS)]


@pytest.mark.parametrize(("method", "optimizer"), _pairings())
def test_every_pairing_steps_or_is_refused(method, optimizer, make_tiny_model, tiny_tokenizer):
    """Every method × every optimizer: one epoch (one step: batch 2 of 2 rows) either moves the
    trainable parameters and logs a finite loss and a grad_norm, or, for a pairing that cannot be
    defined (a method needing gradients × an optimizer with gradient-free steps), is refused with a
    one-line ConfigError before any step. lr 1e-2 so that one step visibly moves every trainable
    matrix of a tiny model (sign/nbit by ±lr; ZO by lr·ĝ along a dense random direction)."""
    from unlearnflow.methods import build_method as build

    model = make_tiny_model()
    algo = build(method)
    enc_f, enc_r = encode(tiny_tokenizer, FORGET), encode(tiny_tokenizer, RETAIN)
    idk = encode(tiny_tokenizer, [(q, "I'm not sure I know that.") for q, _ in FORGET])
    data = {"forget": enc_f, "retain": enc_r, "idk": idk}
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = lambda: train.run(  # noqa: E731
        model, algo, optimizer, data, cfg, pad_token_id=tiny_tokenizer.pad_token_id, device=CPU
    )
    if algo.needs_grad and OPTIMIZERS.get(optimizer).zeroth_order:
        with pytest.raises(ConfigError, match=rf"{method}|{type(algo).__name__}.*{optimizer}"):
            run()
        return
    result = run()
    row = result.rows[-1]
    assert math.isfinite(row["loss"]) and "grad_norm" in row, row
    # Matrices: plain SGD's update of a norm gain (≈ 1.0) can round to nothing in float32.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    still = [n for n, p in model.named_parameters() if n in trainable and torch.equal(before[n], p.detach())]
    assert trainable and not still, f"{method} × {optimizer}: {still} did not move"
