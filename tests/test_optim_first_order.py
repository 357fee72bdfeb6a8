"""Compressed first-order (signsgd, signadam, nbit) and second-order (sophia) optimizers.

The optimizers are driven as the loop drives them (seam.py): ``build_gradient(opt, closure)`` then
``opt.step()`` with no arguments, with a fake ``StepClosure`` that writes chosen gradients, so the
tests do not depend on train.py. Parameters and learning rates are dyadic (k/2^n) where a test
asserts exact equality, so that θ − lr·s is computed without rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from unlearnflow.errors import ConfigError
from unlearnflow.optim import OPTIMIZERS, build_optimizer
from unlearnflow.optim.first_order import NBit, SignAdam, SignSGD, Sophia, quantize
from unlearnflow.optim.seam import StepClosure, build_gradient

MINE = ["signsgd", "signadam", "nbit", "sophia"]


class FakeClosure:
    """A ``StepClosure`` whose gradient comes from ``grad_fn(params) -> {param: grad}``.

    Like the loop's closure it sets every ``.grad`` to None first, so a parameter missing from the
    mapping ends with ``.grad`` None. ``sampled_backward`` (the Sophia GNB probe) writes
    ``probe_fn(step)`` instead, records the step, and returns ``tokens_fn(step)`` as B.
    """

    def __init__(
        self,
        params: list[Tensor],
        step: int,
        grad_fn: Callable[[list[Tensor]], dict[Tensor, Tensor]],
        probe_fn: Callable[[int], dict[Tensor, Tensor]] | None = None,
        tokens_fn: Callable[[int], int] = lambda step: 4,
        probes: list[int] | None = None,
    ) -> None:
        self.params, self.step, self.grad_fn = params, step, grad_fn
        self.probe_fn, self.tokens_fn = probe_fn, tokens_fn
        self.probes = probes if probes is not None else []

    def _write(self, grads: dict[Tensor, Tensor]) -> None:
        for p in self.params:
            p.grad = None
        for p, g in grads.items():
            p.grad = g.clone()

    def __call__(self) -> Tensor:
        self._write(self.grad_fn(self.params))
        return torch.tensor(0.0)

    def sampled_backward(self) -> int:
        self.probes.append(self.step)
        assert self.probe_fn is not None
        self._write(self.probe_fn(self.step))
        return self.tokens_fn(self.step)

    def report(self, **stats: float) -> None:
        pass


def fixed(grads: list[dict[int, list[float]]]) -> Callable[[int], Callable]:
    """Per step t, a grad_fn giving parameter i the gradient ``grads[t][i]``."""
    return lambda t: lambda params: {params[i]: torch.tensor(g) for i, g in grads[t].items()}


def drive(opt: torch.optim.Optimizer, params: list[Tensor], grad_fn_at, steps: range, **kw) -> None:
    """The loop's first-order step: ``build_gradient`` (one closure call, or sophia's gradient())."""
    for t in steps:
        closure = FakeClosure(params, t, grad_fn_at(t), **kw)
        build_gradient(opt, closure)
        opt.step()
        opt.zero_grad(set_to_none=True)


def quadratic(params: list[Tensor]) -> dict[Tensor, Tensor]:
    """∇ of L(θ) = Σ_p Σ_j (j+1)/7·θ_pj² + sin(j)·θ_pj: depends on θ, so a resume must match it."""
    out = {}
    for p in params:
        j = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)
        out[p] = 2 * (j + 1) / 7 * p.detach() + torch.sin(j)
    return out


def wobbly(t: int) -> Callable[[list[Tensor]], dict[Tensor, Tensor]]:
    """``quadratic`` plus 2·cos(1.7·t + j): g's sign flips from step to step while the momentum's
    lags, so a resume that lost m (or v, t) takes a different step."""

    def grad_fn(params: list[Tensor]) -> dict[Tensor, Tensor]:
        out = quadratic(params)
        for p, g in out.items():
            j = torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape)
            g += 2 * torch.cos(1.7 * t + j)
        return out

    return grad_fn


def gnb_probe(params: list[Tensor]) -> Callable[[int], dict[Tensor, Tensor]]:
    """A reproducible stand-in for the sampled-label gradient ĝ: N(0, 1) seeded by the step."""

    def probe(step: int) -> dict[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(step)
        return {p: torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params}

    return probe


BUILDERS: dict[str, Callable[[list[Tensor], float, float], torch.optim.Optimizer]] = {
    "signsgd": lambda ps, lr, wd: SignSGD(ps, lr=lr, weight_decay=wd),
    "signadam": lambda ps, lr, wd: SignAdam(ps, lr=lr, weight_decay=wd),
    "nbit1": lambda ps, lr, wd: NBit(ps, lr=lr, bits=1, weight_decay=wd),
    "nbit3": lambda ps, lr, wd: NBit(ps, lr=lr, bits=3, weight_decay=wd),
    # ε = 0.5: Q's per-tensor scale cancels the bias corrections (scalars) unless ε is not negligible;
    # 8 bits, so that the resume test sees a change in t through them.
    "nbit8_adam": lambda ps, lr, wd: NBit(ps, lr=lr, bits=8, direction="adam", eps=0.5, weight_decay=wd),
    # ρ = 1, β2 = ½: most coordinates off the clip (|m| < ρBh), so m, h and B all shape the step.
    "sophia": lambda ps, lr, wd: Sophia(
        ps, lr=lr, betas=(0.9, 0.5), rho=1.0, weight_decay=wd, hessian_every=3
    ),
}


def run_any(name: str, opt: torch.optim.Optimizer, params: list[Tensor], steps: range, probes=None) -> None:
    """Drive any optimizer of BUILDERS on ``wobbly``; sophia's B = 3 + step differs per refresh."""
    drive(
        opt,
        params,
        wobbly,
        steps,
        probe_fn=gnb_probe(params),
        tokens_fn=lambda step: 3 + step,
        probes=probes,
    )


def test_fake_closure_is_a_step_closure():
    assert isinstance(FakeClosure([], 0, quadratic), StepClosure)


@pytest.mark.parametrize("name", ["signsgd", "signadam", "nbit1"])
def test_sign_step_moves_every_coordinate_by_exactly_lr(name):
    """One step, wd = 0, lr = 2⁻⁴: Δθ/lr = −sign(direction) and the direction's sign is sign(g).

    signsgd: sign(g). signadam and nbit(bits=1): m₁ = (1 − β1)·g, so sign(m₁) = sign(g).
    g = [0.3, −2, 0, 1e−8, −5] → (θ − θ')/lr = [1, −1, 0, 1, −1] (sign(0) = 0, tiny g still ±1);
    the matrix g = [[3, −3], [0, 7]] → [[1, −1], [0, 1]]. θ is dyadic, so θ − θ' is exact.
    """
    lr = 2.0**-4
    vec = torch.tensor([0.5, -0.25, 1.0, 0.0, 2.0])
    mat = torch.tensor([[1.0, -1.0], [0.5, 4.0]])
    params = [vec.clone(), mat.clone()]
    opt = BUILDERS[name](params, lr, 0.0)
    grads = [{0: [0.3, -2.0, 0.0, 1e-8, -5.0], 1: [[3.0, -3.0], [0.0, 7.0]]}]
    drive(opt, params, fixed(grads), range(1))
    assert torch.equal((vec - params[0]) / lr, torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]))
    assert torch.equal((mat - params[1]) / lr, torch.tensor([[1.0, -1.0], [0.0, 1.0]]))


def test_signadam_follows_the_momentum_not_the_gradient():
    """β1 = ½, lr = ⅛, θ₀ = [1, 1], m ← ½m + ½g.

    coord 0: g = 8, −1, −1 → m = 4, 1.5, 0.25: m stays positive though g flips, θ = ⅞, ¾, ⅝
             (signsgd would go back up on steps 2 and 3).
    coord 1: g = −2, 1, 4 → m = −1, 0, 2: θ = 9/8, 9/8 (sign(m) = 0 while g = 1), 1.
    """
    params = [torch.tensor([1.0, 1.0])]
    opt = SignAdam(params, lr=0.125, beta1=0.5)
    grads = [{0: [8.0, -2.0]}, {0: [-1.0, 1.0]}, {0: [-1.0, 4.0]}]
    expected = [[0.875, 1.125], [0.75, 1.125], [0.625, 1.0]]
    for t in range(3):
        drive(opt, params, fixed(grads), range(t, t + 1))
        assert torch.equal(params[0], torch.tensor(expected[t])), t
    assert torch.equal(opt.state[params[0]]["exp_avg"], torch.tensor([0.25, 2.0]))


def test_quantize_levels():
    """d = [0.9, −0.3, 0.5, 0.1, −1.2, 0], max|d| = 1.2.

    bits 2 (L = 1): round(d/1.2) = round([.75, −.25, .42, .08, −1, 0]) = [1, 0, 0, 0, −1, 0].
    bits 3 (L = 3): round(3d/1.2) = round([2.25, −.75, 1.25, .25, −3, 0]) = [2, −1, 1, 0, −3, 0], /3.
    Ties go to even: d = [0.5, 1.5, 2.5, −3], bits 3, max 3: round(d) = [0, 2, 2, −3], /3.
    bits 1 is the sign; an all-zero d quantizes to 0 (no 0/0).
    """
    d = torch.tensor([0.9, -0.3, 0.5, 0.1, -1.2, 0.0])
    assert torch.equal(quantize(d, 2), torch.tensor([1.0, 0.0, 0.0, 0.0, -1.0, 0.0]))
    assert torch.equal(quantize(d, 3), torch.tensor([2.0, -1.0, 1.0, 0.0, -3.0, 0.0]) / 3)
    assert torch.equal(quantize(torch.tensor([0.5, 1.5, 2.5, -3.0]), 3), torch.tensor([0.0, 2, 2, -3]) / 3)
    assert torch.equal(quantize(d, 1), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 0.0]))
    assert torch.equal(quantize(torch.zeros(3), 3), torch.zeros(3))
    assert torch.equal(quantize(torch.zeros(3), 2), torch.zeros(3))


@pytest.mark.parametrize(
    ("bits", "expected"), [(2, [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]), (3, [2 / 3, -1 / 3, 1 / 3, 0.0, -1.0, 0.0])]
)
def test_nbit_step_uses_the_levels(bits, expected):
    """β1 = 0 makes d = m = g; one step: (θ − θ')/lr = Q(g; N) (levels as in test_quantize_levels)."""
    lr = 0.25
    params = [torch.zeros(6)]
    opt = NBit(params, lr=lr, bits=bits, betas=(0.0, 0.999))
    drive(opt, params, fixed([{0: [0.9, -0.3, 0.5, 0.1, -1.2, 0.0]}]), range(1))
    torch.testing.assert_close(-params[0] / lr, torch.tensor(expected), rtol=0, atol=1e-7)


def test_nbit_adam_direction_differs_from_momentum():
    """β = (½, ½), ε = 1e−8, bits 3 (L = 3), g₁ = [2, 1], g₂ = [0, 3]; the second step's Q.

    m₂ = ½(½g₁) + ½g₂ = [0.5, 1.75], v₂ = ½(½g₁²) + ½g₂² = [1, 4.75], both bias corrections ¾:
    adam: d = m̂/√v̂ = [(2/3)/√(4/3), (7/3)/√(19/3)] = [0.5774, 0.9272], 3·0.5774/0.9272 = 1.87 → Q = [2/3, 1];
    momentum: d = m₂, 3·0.5/1.75 = 0.86 → Q = [1/3, 1].
    """
    grads = [{0: [2.0, 1.0]}, {0: [0.0, 3.0]}]
    for direction, q2 in (("adam", [2 / 3, 1.0]), ("momentum", [1 / 3, 1.0])):
        params = [torch.zeros(2)]
        opt = NBit(params, lr=0.5, bits=3, direction=direction, betas=(0.5, 0.5))
        drive(opt, params, fixed(grads), range(1))
        after1 = params[0].clone()
        drive(opt, params, fixed(grads), range(1, 2))
        torch.testing.assert_close((after1 - params[0]) / 0.5, torch.tensor(q2), rtol=0, atol=1e-6)
    assert opt.state[params[0]].keys() == {"exp_avg"}  # momentum keeps no v
    m = opt.state[params[0]]["exp_avg"]
    assert torch.equal(m, torch.tensor([0.5, 1.75]))


def test_nbit_one_bit_is_signadam_bit_for_bit():
    """nbit(bits=1, direction momentum) and signadam share β1 = 0.9, wd = 0.1: 5 random steps equal."""
    gen = torch.Generator().manual_seed(7)
    start = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    grads = [{i: torch.randn(p.shape, generator=gen).tolist() for i, p in enumerate(start)} for _ in range(5)]
    a, b = [p.clone() for p in start], [p.clone() for p in start]
    opt_a = NBit(a, lr=1e-2, bits=1, betas=(0.9, 0.999), weight_decay=0.1)
    opt_b = SignAdam(b, lr=1e-2, beta1=0.9, weight_decay=0.1)
    for t in range(5):
        drive(opt_a, a, fixed(grads), range(t, t + 1))
        drive(opt_b, b, fixed(grads), range(t, t + 1))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), t
    assert not torch.equal(a[0], start[0])


@pytest.mark.parametrize("name", ["signsgd", "signadam", "nbit1", "nbit3"])
def test_weight_decay_is_decoupled(name):
    """θ = [2, −4], g = [1, 1], lr = ¼, wd = ½; every direction here is [1, 1] (nbit3: max|g| = 1).

    decoupled: θ(1 − lr·wd) − lr·[1, 1] = [1.75 − .25, −3.5 − .25] = [1.5, −3.75].
    (L2 folded into g would give g + wd·θ = [2, −1], sign [1, −1], θ' = [1.75, −3.75]; no decay [1.75, −4.25].)
    """
    params = [torch.tensor([2.0, -4.0])]
    opt = BUILDERS[name](params, 0.25, 0.5)
    drive(opt, params, fixed([{0: [1.0, 1.0]}]), range(1))
    assert torch.equal(params[0], torch.tensor([1.5, -3.75]))


def test_sophia_update_matches_the_paper_rule():
    """One SophiaG step on hand values (Liu et al. 2023, Alg. 3, GNB estimator).

    β = (½, ½), ρ = ½, lr = 0.1, wd = ½, θ = [1, 2, −1]. Step 0 refreshes: ĝ = [1, 2, 1], B = 4:
      h = ½·0 + ½·ĝ² = [0.5, 2, 0.5] (the package keeps ĝ⊙ĝ; ĥ = B·h), ρ·B·h = [1, 4, 1].
    Then g = [1, −2, 8]: m = ½g = [0.5, −1, 4]; |m|/(ρBh) = [0.5, 0.25, 4] → clip at 1: [0.5, 0.25, 1].
    θ' = θ(1 − lr·wd) − lr·sign(m)·min(·, 1) = [0.95 − 0.05, 1.9 + 0.025, −0.95 − 0.1]
       = [0.9, 1.925, −1.05] (the third coordinate in the clipping branch).
    """
    params = [torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)]
    opt = Sophia(params, lr=0.1, betas=(0.5, 0.5), rho=0.5, weight_decay=0.5)
    probe = {0: torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)}
    drive(
        opt,
        params,
        lambda t: lambda ps: {ps[0]: torch.tensor([1.0, -2.0, 8.0], dtype=torch.float64)},
        range(1),
        probe_fn=lambda step: {params[0]: probe[step]},
        tokens_fn=lambda step: 4,
    )
    state = opt.state[params[0]]
    assert torch.equal(state["hessian"], torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64))
    assert torch.equal(state["exp_avg"], torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64))
    assert opt.param_groups[0]["hessian_bs"] == 4
    torch.testing.assert_close(
        params[0], torch.tensor([0.9, 1.925, -1.05], dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_sophia_refreshes_the_hessian_every_k_steps():
    """k = 3 over steps 0..7: sampled_backward runs on steps 0, 3, 6 only; B is the last refresh's."""
    params = [torch.tensor([0.5, -0.5, 1.0])]
    opt = Sophia(params, lr=1e-2, hessian_every=3)
    probes: list[int] = []
    run_any("sophia", opt, params, range(8), probes=probes)
    assert probes == [0, 3, 6]
    assert opt.param_groups[0]["hessian_bs"] == 3 + 6


@pytest.mark.parametrize("name", list(BUILDERS))
def test_param_without_grad_is_untouched_and_stateless(name):
    """b takes part in no loss (grad None every step): not decayed (wd = 0.1), not moved, no state."""
    a, b = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, -2.0])
    b0 = b.clone()
    params = [a, b]
    opt = BUILDERS[name](params, 0.1, 0.1)
    drive(
        opt,
        params,
        lambda t: lambda ps: {ps[0]: quadratic([ps[0]])[ps[0]]},
        range(4),
        probe_fn=lambda step: {a: torch.ones(3)},
    )
    assert torch.equal(b, b0)
    assert b not in opt.state
    assert not torch.equal(a, torch.tensor([0.5, -1.0, 2.0]))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_resume_equals_uninterrupted(name):
    """7 steps straight vs 4 steps, state_dict → a fresh optimizer over copies, 3 more: bit-equal.

    sophia (k = 3) is interrupted between refreshes 3 and 6, with B = 3 + step, so the resumed run
    needs the stored h, m and B (= 6 from step 3) for steps 4 and 5.
    """
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(3, 2, generator=gen), torch.randn(2, generator=gen)]
    straight = [p.clone() for p in start]
    run_any(name, BUILDERS[name](straight, 0.05, 0.1), straight, range(7))

    first = [p.clone() for p in start]
    opt = BUILDERS[name](first, 0.05, 0.1)
    run_any(name, opt, first, range(4))
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.clone() for p in first]
    opt2 = BUILDERS[name](resumed, 0.05, 0.1)
    opt2.load_state_dict(saved)
    run_any(name, opt2, resumed, range(4, 7))
    for x, y in zip(straight, resumed, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", MINE)
def test_builds_through_the_registry(name):
    """build_optimizer on nn.Linear(4, 3): lr everywhere, wd on the weight only, one step moves it."""
    model = torch.nn.Linear(4, 3)
    opt, spec = build_optimizer(name, model, lr=0.01, weight_decay=0.1)
    assert spec is OPTIMIZERS.get(name) and not spec.zeroth_order
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 0.1), (0.01, 0.0)]
    w0 = model.weight.detach().clone()
    params = list(model.parameters())
    run_any(name, opt, params, range(1))
    assert not torch.equal(model.weight, w0)


def test_registry_args_reach_the_optimizer():
    model = torch.nn.Linear(2, 2)
    opt, _ = build_optimizer("nbit", model, lr=0.1, weight_decay=0.0, args={"bits": 4, "direction": "adam"})
    assert (opt.defaults["bits"], opt.defaults["direction"]) == (4, "adam")
    opt, _ = build_optimizer(
        "sophia", model, lr=0.1, weight_decay=0.0, args={"rho": 0.02, "hessian_every": 5}
    )
    assert (opt.defaults["rho"], opt.hessian_every, opt.defaults["betas"]) == (0.02, 5, (0.965, 0.99))
    opt, _ = build_optimizer("signadam", model, lr=0.1, weight_decay=0.0, args={"beta1": 0.5})
    assert opt.defaults["beta1"] == 0.5


@pytest.mark.parametrize(
    ("name", "args", "key"),
    [
        ("nbit", {"bits": 0}, "nbit.bits"),
        ("nbit", {"direction": "sgd"}, "nbit.direction"),
        ("nbit", {"betas": [0.9, 1.0]}, "nbit.betas.1"),
        ("sophia", {"betas": [1.5, 0.9]}, "sophia.betas.0"),
        ("sophia", {"rho": 0}, "sophia.rho"),
        ("sophia", {"hessian_every": 0}, "sophia.hessian_every"),
        ("signadam", {"beta1": 1.0}, "signadam.beta1"),
        ("signsgd", {"momentum": 0.9}, "unknown key unlearn.optimizer_args.signsgd.momentum"),
    ],
)
def test_bad_args_are_one_line_config_errors(name, args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as exc:
        build_optimizer(name, torch.nn.Linear(2, 2), lr=0.1, weight_decay=0.0, args=args)
    assert "\n" not in str(exc.value)


def test_sign_steps_are_bounded_by_lr():
    """Every optimizer here but sophia moves a coordinate by at most lr per step (wd = 0): |Q| ≤ 1;
    sophia's clip(·, 1) bounds it too."""
    gen = torch.Generator().manual_seed(11)
    for name in BUILDERS:
        params = [torch.randn(5, generator=gen) * 10]
        opt = BUILDERS[name](params, 0.5, 0.0)
        for t in range(3):
            before = params[0].clone()
            run_any(name, opt, params, range(t, t + 1))
            # θ ~ 10: one ulp of rounding in θ − lr·q is ~1e-6, far below what an unbounded step adds.
            assert (before - params[0]).abs().max() <= 0.5 + 1e-5, (name, t)
