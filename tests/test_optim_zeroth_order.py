"""Zeroth-order optimizers, fo_zo and fo_rs (issue 10; ALGORITHMS.md §3; optim/zeroth_order.py, hybrid.py).

Most tests run on a quadratic L(θ) = ½(θ − a)ᵀA(θ − a) over θ ∈ R⁵ in float64, split over two
modules (θ[:3] as a vector, θ[3:] as a 1×2 matrix) so the hooks have modules to act on and the
direction's parameter index matters. Central differences are exact on a quadratic:
(L(θ + μu) − L(θ − μu))/(2μ) = ∇L·u with ∇L = A(θ − a), up to float64 rounding. Optimizers are
driven directly with a fake ``StepClosure`` (seam.py), never through ``train.run``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from unlearnflow.errors import ConfigError
from unlearnflow.optim import OPTIMIZERS, build_optimizer, param_groups
from unlearnflow.optim.hybrid import fo_zo_is_zeroth_order
from unlearnflow.optim.seam import BuildContext, StepClosure
from unlearnflow.optim.zeroth_order import direction, direction_seed, perturbed

D = 5
MU = 1e-3


class Part(nn.Module):
    """Owns one block of θ; its forward returns the block it sees (perturbed inside ``perturbed``)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone())
        self.seen: list[Tensor] = []

    def forward(self) -> Tensor:
        self.seen.append(self.weight.detach().clone())
        return self.weight.flatten()


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        m = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / D + torch.eye(D, dtype=torch.float64))
        self.register_buffer("a", torch.randn(D, generator=g, dtype=torch.float64))
        theta = torch.randn(D, generator=g, dtype=torch.float64)
        self.first, self.second = Part(theta[:3]), Part(theta[3:].reshape(1, 2))

    def forward(self) -> Tensor:
        r = torch.cat([self.first(), self.second()]) - self.a
        return 0.5 * r @ self.A @ r

    def theta(self) -> Tensor:
        return torch.cat([self.first.weight.detach().flatten(), self.second.weight.detach().flatten()])

    def grad_at(self, theta: Tensor) -> Tensor:
        return self.A @ (theta - self.a)


class FakeClosure:
    """The StepClosure contract: with gradients it resets ``.grad`` and runs backward; it records
    what each call saw (grad mode, whether a graph was built, the parameters' ``_version``)."""

    def __init__(self, model: nn.Module, step: int = 0) -> None:
        self.model, self.step = model, step
        self.losses: list[Tensor] = []
        self.grad_enabled: list[bool] = []
        self.graph: list[bool] = []
        self.versions: list[list[int]] = []
        self.stats: dict[str, float] = {}

    def __call__(self) -> Tensor:
        grad = torch.is_grad_enabled()
        if grad:
            for p in self.model.parameters():
                p.grad = None
        loss = self.model()
        self.grad_enabled.append(grad)
        self.graph.append(loss.grad_fn is not None)
        self.versions.append([p._version for p in self.model.parameters()])
        if grad:
            loss.backward()
        self.losses.append(loss.detach())
        return loss.detach()

    def sampled_backward(self) -> int:
        raise AssertionError("no optimizer here needs the Sophia probe")

    def report(self, **stats: float) -> None:
        self.stats.update(stats)


def build(
    name: str,
    model: nn.Module,
    *,
    lr: float = 1.0,
    wd: float = 0.0,
    seed: int = 0,
    reduce=None,
    total=None,
    **args,
):
    ctx = BuildContext(model=model, seed=seed, all_reduce_mean=reduce or (lambda t: t), total_steps=total)
    return build_optimizer(name, model, lr=lr, weight_decay=wd, args=args, ctx=ctx)[0]


def flat(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def zo_step(opt: torch.optim.Optimizer, closure: FakeClosure) -> Tensor:
    with torch.no_grad():
        return opt.step(closure)


def regen(seed: int, step: int, i: int, params: list[Tensor], dist: str) -> list[Tensor]:
    """u_i of step ``step`` regenerated in the test: N(0, I) per parameter from its own seeded
    generator; on the sphere divided by the norm over all parameters (float64 sum of squares)."""
    zs = [
        torch.randn(
            p.shape, generator=torch.Generator().manual_seed(direction_seed(seed, step, i, j)), dtype=p.dtype
        )
        for j, p in enumerate(params)
    ]
    if dist == "gaussian":
        return zs
    scale = 1.0 / math.sqrt(
        math.fsum(float(torch.linalg.vector_norm(z, dtype=torch.float64)) ** 2 for z in zs)
    )
    return [z.mul_(scale) for z in zs]


def as_theta(model: Quadratic, per_param: dict[Tensor, Tensor]) -> Tensor:
    """Per-parameter blocks → the model's θ order (first's 3, then second's 2)."""
    return torch.cat([per_param[model.first.weight].flatten(), per_param[model.second.weight].flatten()])


def estimate(model: Quadratic, opt: torch.optim.Optimizer) -> Tensor:
    """ĝ of one zo_sgd step with lr = 1, wd = 0: θ_before − θ_after (float64, exact to ~1e-16)."""
    start = {p: p.detach().clone() for p in flat(opt)}
    zo_step(opt, FakeClosure(model))
    return as_theta(model, {p: start[p] - p.detach() for p in flat(opt)})


# ----------------------------------------------------------------------------------------------
# Estimator: convergence in q, the directional-derivative formula, the scale φ


@pytest.mark.parametrize(("dist", "k"), [("gaussian", D + 1), ("sphere", D - 1)])
def test_estimate_converges_to_the_gradient_as_q_grows(dist, k):
    """E‖ĝ − ∇L‖² = k‖∇L‖²/q with k = d + 1 (Gaussian: E[(g·u)²‖u‖²] = (d + 2)‖g‖², minus ‖g‖²) or
    k = d − 1 (sphere with φ = d: d²·E[(g·u)²] = d‖g‖², minus ‖g‖²). Markov on ‖e‖²: the relative
    error exceeds 3·√(k/q) with probability ≤ 1/9; at the fixed seed it stays below for
    q = 1, 16, 256, 1024 (bounds ≈ 7.3/6, 1.8/1.5, 0.46/0.38, 0.23/0.19), and falls with q."""
    errors = []
    for q in (1, 16, 256, 1024):
        model = Quadratic()
        g = model.grad_at(model.theta())
        ghat = estimate(model, build("zo_sgd", model, q=q, zo_dist=dist, seed=7))
        errors.append(float((ghat - g).norm() / g.norm()))
        assert errors[-1] < 3 * math.sqrt(k / q), (q, errors[-1])
    assert errors[-1] < errors[0] / 5, errors


@pytest.mark.parametrize(("dist", "k"), [("gaussian", D + 1), ("sphere", D - 1)])
def test_q1_estimate_is_the_directional_derivative_and_unbiased(dist, k):
    """At q = 1 and a given seed, ĝ = φ·(∇L·u)·u exactly (central differences are exact on a
    quadratic), φ = 1 (Gaussian) or d = 5 (sphere). Over N = 1000 seeds the mean of ĝ has
    E‖mean − ∇L‖² = k‖∇L‖²/N (k as above): within 4·√(k/N)·‖∇L‖ (≈ 0.31 / 0.25 relative). A wrong
    φ on the sphere (1 instead of d) would leave the mean at ∇L/d, 0.8‖∇L‖ away."""
    n = 1000
    phi = D if dist == "sphere" else 1
    model = Quadratic()
    theta0 = {p: p.detach().clone() for p in model.parameters()}
    g = model.grad_at(model.theta())
    total = torch.zeros(D, dtype=torch.float64)
    for seed in range(n):
        opt = build("zo_sgd", model, zo_dist=dist, seed=seed)
        u = regen(seed, 0, 0, flat(opt), dist)
        u = as_theta(model, dict(zip(flat(opt), u, strict=True)))
        ghat = estimate(model, opt)
        torch.testing.assert_close(ghat, phi * (g @ u) * u, rtol=1e-8, atol=1e-10)
        total += ghat
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(theta0[p])
    assert float((total / n - g).norm()) < 4 * math.sqrt(k / n) * float(g.norm())


# ----------------------------------------------------------------------------------------------
# A ZO step: no gradients, exact update, θ never written during the evaluations


def test_zo_step_builds_no_graph_and_leaves_grad_none():
    """Every evaluation runs with grad disabled and returns a loss without grad_fn; no ``.grad`` is
    written; 2q evaluations; the returned loss is their mean (the loss at θ to O(μ²)); a step with
    gradients enabled is refused (the loop's no_grad is asserted)."""
    model = Quadratic()
    opt = build("zo_adam", model, lr=1e-2, q=3)
    closure = FakeClosure(model)
    loss = zo_step(opt, closure)
    assert len(closure.losses) == 6
    assert closure.grad_enabled == [False] * 6 and closure.graph == [False] * 6
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(loss, torch.stack(closure.losses).mean(), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="no_grad"):
        opt.step(FakeClosure(model))


@pytest.mark.parametrize("dist", ["gaussian", "sphere"])
def test_zo_sgd_update_is_exact_and_parameters_are_never_written_during_evaluations(dist):
    """θ_after = θ(1 − lr·wd) − lr·ĝ bit for bit (torch.equal), with ĝ_p = Σ_i w_i·u_{i,p} built
    here in the implementation's order: c_i = (L₊ − L₋)/(2μ) in float64 from the recorded
    evaluations, w_i = c_i·φ/q, u regenerated from the seeds. The matrix block decays (wd = 0.1,
    nanoGPT's split), the vector does not. Every evaluation sees the parameters' ``_version``
    unchanged (nothing written in place), and the step reports grad_norm = ‖ĝ‖."""
    model = Quadratic()
    lr, wd, q, seed = 0.05, 0.1, 3, 11
    opt = build("zo_sgd", model, lr=lr, wd=wd, q=q, zo_dist=dist, seed=seed)
    params = flat(opt)
    start = [p.detach().clone() for p in params]
    versions = [p._version for p in model.parameters()]
    closure = FakeClosure(model)
    zo_step(opt, closure)

    assert closure.versions == [versions] * (2 * q)
    phi = float(D) if dist == "sphere" else 1.0
    c = [
        (closure.losses[2 * i].double() - closure.losses[2 * i + 1].double()).reshape(()) / (2 * MU)
        for i in range(q)
    ]
    w = (torch.stack(c) * (phi / q)).tolist()
    us = [regen(seed, 0, i, params, dist) for i in range(q)]
    norm_sq = 0.0
    for j, (p, p0, group_wd) in enumerate(zip(params, start, [wd, 0.0], strict=True)):
        g = torch.zeros_like(p0)
        for i in range(q):
            g.add_(us[i][j], alpha=w[i])
        expected = p0.mul(1 - lr * group_wd) if group_wd else p0
        assert torch.equal(p.detach(), expected.add(g, alpha=-lr)), j
        norm_sq += float(g.square().sum())
    assert closure.stats["grad_norm"] == pytest.approx(math.sqrt(norm_sq), rel=1e-12)


def test_in_place_round_trip_is_not_exact_but_at_use_perturbation_is():
    """Why ``perturbed`` exists: MeZO's θ += μu; θ −= 2μu; θ += μu does not return random float32
    weights to θ bit for bit (rounding is not invertible), while the at-use scheme never writes θ:
    the forward sees θ + μu, and afterwards θ is the same tensor, equal and unversioned."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(10_000, generator=g) * 0.02
    u = torch.randn(10_000, generator=g)
    mezo = theta.clone()
    mezo.add_(u, alpha=MU).add_(u, alpha=-2 * MU).add_(u, alpha=MU)
    assert not torch.equal(mezo, theta)

    part = Part(theta)
    version = part.weight._version
    with torch.no_grad(), perturbed(part, [part.weight], MU, lambda j, p: u) as applied:
        part()
    assert applied == {0}
    torch.testing.assert_close(part.seen[0], torch.add(theta, u, alpha=MU), rtol=0, atol=0)
    assert torch.equal(part.weight, theta) and part.weight._version == version
    assert isinstance(part.weight, nn.Parameter) and part._parameters["weight"] is part.weight


def test_perturbed_restores_parameters_when_the_forward_raises():
    """A forward that raises never reaches its forward hook: leaving the block still restores θ."""
    part = Part(torch.ones(3))
    param = part.weight

    def boom(module, args, out):
        raise RuntimeError("boom")

    part.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), perturbed(part, [param], 1.0, lambda j, p: torch.ones(3)):
        part()
    assert part._parameters["weight"] is param


def test_perturbed_reaches_every_parameter_of_the_tied_tiny_llama(make_tiny_model):
    """On the embedded Llama (embed_tokens and lm_head share one Parameter) every trainable parameter
    is used inside its own module's forward, the logits move, and θ is untouched afterwards."""
    model = make_tiny_model().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    start = [(p.detach().clone(), p._version) for p in params]
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with perturbed(model, params, 1e-2, lambda j, p: torch.ones_like(p)) as applied:
            moved = model(input_ids=ids).logits
    assert applied == set(range(len(params)))
    assert not torch.allclose(base, moved)
    assert all(torch.equal(p, p0) and p._version == v for p, (p0, v) in zip(params, start, strict=True))


def test_zo_step_on_the_tiny_llama_moves_every_parameter(make_tiny_model):
    """A zo_adam step through the real tied model: the loss comes back finite, every parameter moves
    (Adam's first step is lr·sign(ĝ) per coordinate) and no gradient is written."""
    model = make_tiny_model()
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self) -> Tensor:
            return self.lm(input_ids=ids, labels=ids).loss

    wrapper = LM()
    opt = build("zo_adam", model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = zo_step(opt, FakeClosure(wrapper))
    assert math.isfinite(float(loss))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_zo_step_through_reused_buffers_equals_fresh_tensors_on_the_tiny_llama(make_tiny_model):
    """The optimizer writes u, θ + c·u and ĝ into reused buffers (``Scratch``); the step must equal,
    bit for bit, the same step built from fresh tensors (``perturbed`` and ``direction`` without a
    scratch), and the buffers must stay the size of a few parameters, not of the model."""
    model = make_tiny_model()
    ref = copy.deepcopy(model)
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])

    def loss_of(lm: nn.Module) -> Tensor:
        return lm(input_ids=ids, labels=ids).loss

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self) -> Tensor:
            return loss_of(self.lm)

    lr, seed = 1e-2, 5
    opt = build("zo_sgd", model, lr=lr, seed=seed)
    zo_step(opt, FakeClosure(LM()))

    # The optimizer's order (param groups: matrices, then vectors) keys the directions.
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    params = [ref_params[names[id(p)]] for p in flat(opt)]
    u = direction(seed, 0, 0, "gaussian", params)
    with torch.no_grad():
        with perturbed(ref, params, MU, u):
            plus = loss_of(ref)
        with perturbed(ref, params, -MU, u):
            minus = loss_of(ref)
        w = float((plus.double() - minus.double()) / (2 * MU))
        for j, p in enumerate(params):
            p.add_(torch.zeros_like(p).add_(u(j, p), alpha=w), alpha=-lr)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name

    held = sum(b.numel() for b in opt._scratch._buffers.values())
    largest = max(p.numel() for p in params)
    # u, ĝ and one θ + c·u (every hooked module here owns a single "weight"): the largest
    # parameter three times; a buffer per parameter would hold the model three times.
    assert held == 3 * largest < 3 * sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------
# Seeds, data parallelism, tied weights


def _three_steps(seed: int) -> list[Tensor]:
    model = Quadratic()
    opt = build("zo_radazo", model, lr=1e-2, seed=seed, q=2)
    for _ in range(3):
        zo_step(opt, FakeClosure(model))
    return [p.detach().clone() for p in model.parameters()]


def test_same_seed_same_parameters_other_seed_different():
    """Directions come only from (seed, step, i, index): two runs with seed 3 agree bit for bit over
    3 steps (the step counter moves the directions on), seed 4 differs."""
    a, b, c = _three_steps(3), _three_steps(3), _three_steps(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_projected_differences_go_through_all_reduce_mean():
    """A fake all_reduce_mean that doubles its input: it receives the q = 2 float64 differences, and
    the update and the reported ‖ĝ‖ double (zo_sgd is linear in ĝ; doubling is exact in floats)."""
    seen: list[Tensor] = []

    def doubling(t: Tensor) -> Tensor:
        seen.append(t.clone())
        return 2 * t

    deltas, norms = [], []
    for reduce in (None, doubling):
        model = Quadratic()
        start = model.theta()
        closure = FakeClosure(model)
        zo_step(build("zo_sgd", model, lr=0.1, q=2, seed=5, reduce=reduce), closure)
        deltas.append(model.theta() - start)
        norms.append(closure.stats["grad_norm"])
    assert len(seen) == 1 and seen[0].shape == (2,) and seen[0].dtype == torch.float64
    torch.testing.assert_close(deltas[1], 2 * deltas[0], rtol=1e-12, atol=0)
    assert norms[1] == 2 * norms[0]


def test_tied_weights_see_the_same_direction():
    """Two modules owning one Parameter (embed_tokens / lm_head): each forward sees θ + μu with the
    same u (the generator is keyed by the parameter's index), and the optimizer holds it once."""
    shared = Part(torch.zeros(4, 3))
    other = Part(torch.zeros(4, 3))
    other.weight = shared.weight

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = shared, other

        def forward(self) -> Tensor:
            return (self.embed() - 1).square().sum() + (self.head() + 1).square().sum()

    model = Tied()
    opt = build("zo_sgd", model, lr=1e-3, seed=2)
    assert len(flat(opt)) == 1
    zo_step(opt, FakeClosure(model))
    plus_embed, minus_embed = shared.seen
    plus_head, minus_head = other.seen
    assert torch.equal(plus_embed, plus_head) and torch.equal(minus_embed, minus_head)
    u = regen(2, 0, 0, flat(opt), "gaussian")[0]
    torch.testing.assert_close(plus_embed, MU * u, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Adaptive rules, by hand


def _hand_ghat(model: Quadratic, params: list[Tensor], seed: int, step: int) -> dict[Tensor, Tensor]:
    """q = 1 Gaussian: ĝ = (∇L·u)u at the current θ (central differences exact on the quadratic)."""
    u = dict(zip(params, regen(seed, step, 0, params, "gaussian"), strict=True))
    g = model.grad_at(model.theta())
    slope = float(g @ as_theta(model, u))
    return {p: slope * u[p] for p in params}


@pytest.mark.parametrize("name", ["zo_adam", "zo_radazo"])
def test_adaptive_zo_rules_match_hand_computed_moments(name):
    """Two steps, β = (0.8, 0.9), ε = 1e-300 (negligible), lr = 0.01, wd = 0.
    zo_adam (bias-corrected Adam): m_t = β₁m + (1−β₁)ĝ_t, v_t = β₂v + (1−β₂)ĝ_t²,
    θ −= lr·(m_t/(1−β₁ᵗ))/(√(v_t/(1−β₂ᵗ)) + ε); at t = 1 that is exactly lr·sign(ĝ).
    zo_radazo (R-AdaZO, no bias correction): v_t = β₂v + (1−β₂)m_t² (from the momentum),
    θ −= lr·m_t/(√v_t + ε); at t = 1: m = (1−β₁)ĝ, v = (1−β₂)(1−β₁)²ĝ², so the step is
    lr·sign(ĝ)/√(1−β₂) = lr·sign(ĝ)·√10."""
    b1, b2, lr, seed = 0.8, 0.9, 0.01, 9
    model = Quadratic()
    opt = build(name, model, lr=lr, seed=seed, betas=(b1, b2), eps=1e-300)
    params = flat(opt)
    m = {p: torch.zeros_like(p) for p in params}
    v = {p: torch.zeros_like(p) for p in params}
    for t in (1, 2):
        ghat = _hand_ghat(model, params, seed, t - 1)
        expected = {}
        for p in params:
            m[p] = b1 * m[p] + (1 - b1) * ghat[p]
            if name == "zo_adam":
                v[p] = b2 * v[p] + (1 - b2) * ghat[p] ** 2
                expected[p] = p.detach() - lr * (m[p] / (1 - b1**t)) / (
                    torch.sqrt(v[p] / (1 - b2**t)) + 1e-300
                )
            else:
                v[p] = b2 * v[p] + (1 - b2) * m[p] ** 2
                expected[p] = p.detach() - lr * m[p] / (torch.sqrt(v[p]) + 1e-300)
        before = {p: p.detach().clone() for p in params}
        zo_step(opt, FakeClosure(model))
        for p in params:
            torch.testing.assert_close(p.detach(), expected[p], rtol=1e-12, atol=1e-15)
            if t == 1:
                first = lr if name == "zo_adam" else lr * math.sqrt(10)
                torch.testing.assert_close(
                    before[p] - p.detach(), first * torch.sign(ghat[p]), rtol=1e-9, atol=0
                )


def test_zo_state_dict_round_trips_the_step_counter_and_moments():
    """A zo_adam restored from a state_dict after 2 steps continues exactly like the original: the
    step counter (directions, bias correction) and the moments survive."""
    model = Quadratic()
    opt = build("zo_adam", model, lr=1e-2, seed=1)
    for _ in range(2):
        zo_step(opt, FakeClosure(model))
    twin = copy.deepcopy(model)
    opt_twin = build("zo_adam", twin, lr=1e-2, seed=1)
    # A deep copy, as a checkpoint file would be: load_state_dict keeps tensors it need not cast.
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_twin.param_groups[0]["zo_step"] == 2
    zo_step(opt, FakeClosure(model))
    zo_step(opt_twin, FakeClosure(twin))
    assert torch.equal(model.theta(), twin.theta())


# ----------------------------------------------------------------------------------------------
# fo_zo


def test_fo_zo_schedule_ends_on_zo_aligned_from_the_end():
    """50 steps, N = 20, 1:1: counted from the end, the last 20 are ZO, the 20 before FO, and the
    first 10 (the remainder) ZO. With phases = 2 over 100 steps: pairs of 50, each FO 25 then ZO
    25; at 1:3 over 16 steps: pairs of 8, FO 2 then ZO 6. Any total ends on ZO."""

    def plan(total, fo, zo, phases=None):
        return [
            fo_zo_is_zeroth_order(s, total=total, fo_steps=fo, zo_steps=zo, phases=phases)
            for s in range(total)
        ]

    assert plan(50, 20, 20) == [True] * 10 + [False] * 20 + [True] * 20
    assert plan(100, 1, 1, phases=2) == ([False] * 25 + [True] * 25) * 2
    assert plan(16, 1, 3, phases=2) == ([False] * 2 + [True] * 6) * 2
    for total in range(1, 90):
        for fo, zo, phases in [(20, 20, None), (3, 1, None), (1, 1, 1), (2, 1, 3), (1, 4, 5)]:
            if phases is not None and 2 * phases > total:
                continue
            steps = plan(total, fo, zo, phases)
            assert steps[-1], (total, fo, zo, phases)
            if phases is not None and total >= 2 * phases * (fo + zo):
                # k pairs: k switches FO → ZO
                assert sum(a != b for a, b in itertools.pairwise(steps)) == 2 * phases - 1
    opt = build("fo_zo", Quadratic(), lr=0.1, total=50)
    assert [opt.is_zeroth_order_step(s) for s in range(50)] == plan(50, 20, 20)


def test_fo_zo_refuses_bad_schedules():
    with pytest.raises(ValueError, match="total_steps"):
        build("fo_zo", Quadratic(), lr=0.1)
    with pytest.raises(ConfigError, match=r"fo_zo\.phases"):
        build("fo_zo", Quadratic(), lr=0.1, total=5, phases=3)


def test_fo_zo_phases_follow_the_schedule_with_separate_moments():
    """fo_zo(lr = 0.1, zo_lr = 0.01) with the scheduler having halved the outer lr: an FO step
    (closure with backward, then ``step()``) equals AdamW at lr 0.05, a ZO step (``step(closure)``
    under no_grad) equals R-AdaZO at lr 0.005, and the next FO step equals AdamW continuing from its
    own moments (the ZO step did not touch them): compared with a reference model driven by
    torch's AdamW and zo_radazo in the same order. The state_dict carries both phases."""
    kw = dict(betas=(0.8, 0.9), eps=1e-8)
    model, ref = Quadratic(), Quadratic()
    opt = build("fo_zo", model, lr=0.1, wd=0.1, seed=4, total=10, zo_lr=0.01, **kw)
    for group in opt.param_groups:  # what LambdaLR does at factor 0.5
        group["lr"] = 0.05
    adamw = torch.optim.AdamW(param_groups(ref, 0.1), lr=0.05, **kw)
    radazo = build("zo_radazo", ref, lr=0.005, wd=0.1, seed=4, **kw)

    def fo(o, m):
        FakeClosure(m)()
        o.step()

    fo(opt, model)
    fo(adamw, ref)
    assert torch.equal(model.theta(), ref.theta())
    zo_step(opt, FakeClosure(model))
    zo_step(radazo, FakeClosure(ref))
    assert torch.equal(model.theta(), ref.theta())
    saved = copy.deepcopy(opt.state_dict())
    fo(opt, model)
    fo(adamw, ref)
    assert torch.equal(model.theta(), ref.theta())

    twin = Quadratic()
    opt_twin = build("fo_zo", twin, lr=0.1, wd=0.1, seed=4, total=10, zo_lr=0.01, **kw)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), ref.parameters(), strict=True):
            p.copy_(q)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    zo_step(opt, FakeClosure(model))
    zo_step(opt_twin, FakeClosure(twin))
    assert torch.equal(model.theta(), twin.theta())
    assert saved["zo"]["param_groups"][0]["zo_step"] == 1 and len(saved["fo"]["state"]) == 2


# ----------------------------------------------------------------------------------------------
# fo_rs


def test_closure_called_twice_leaves_one_evaluation():
    """The fake closure honours the contract fo_rs relies on: two calls leave ∇L once, not 2∇L."""
    model = Quadratic()
    closure = FakeClosure(model)
    closure()
    closure()
    torch.testing.assert_close(
        as_theta(model, {p: p.grad for p in model.parameters()}), model.grad_at(model.theta())
    )


def test_fo_rs_gradient_without_noise_is_one_evaluation():
    """σ = 0: every one of the n = 3 evaluations is ∇L(θ), and their mean is ∇L(θ), not 3∇L(θ)."""
    model = Quadratic()
    opt = build("fo_rs", model, n=3, sigma=0.0)
    closure = FakeClosure(model)
    opt.gradient(closure)
    assert closure.grad_enabled == [True] * 3
    grad = as_theta(model, {p: p.grad for p in model.parameters()})
    torch.testing.assert_close(grad, model.grad_at(model.theta()), rtol=1e-14, atol=0)


def test_fo_rs_gradient_is_the_mean_over_perturbations_and_theta_is_untouched():
    """σ = 0.1, n = 4, step 6, seed 8: .grad = (1/n)·Σ_i ∇L(θ + σz_i) = A(θ + σ·mean_i z_i − a), with
    z_i regenerated here from (seed, step, i, index); it differs from ∇L(θ); θ is neither changed
    nor written (``_version``), and another step draws other z_i."""
    sigma, n, step, seed = 0.1, 4, 6, 8
    model = Quadratic()
    opt = build("fo_rs", model, seed=seed, n=n, sigma=sigma)
    params = flat(opt)
    theta = model.theta()
    versions = [p._version for p in params]
    opt.gradient(FakeClosure(model, step=step))
    grads = [
        model.grad_at(
            theta
            + sigma
            * as_theta(model, dict(zip(params, regen(seed, step, i, params, "gaussian"), strict=True)))
        )
        for i in range(n)
    ]
    got = as_theta(model, {p: p.grad for p in params})
    torch.testing.assert_close(got, torch.stack(grads).mean(0), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got, model.grad_at(theta))
    assert torch.equal(model.theta(), theta) and [p._version for p in params] == versions
    opt.gradient(FakeClosure(model, step=step + 1))
    assert not torch.allclose(as_theta(model, {p: p.grad for p in params}), got)


# ----------------------------------------------------------------------------------------------
# Registration


def test_registered_with_their_grades_and_public_defaults():
    """zo_* are gradient-free, fo_zo mixes both, fo_rs is plain first order; defaults: μ = 1e-3,
    q = 1, Gaussian (MeZO), N = 20 at 1:1 (fo_zo), n = 3, σ = 1e-4 (fo_rs)."""
    for name in ("zo_sgd", "zo_adam", "zo_radazo"):
        spec = OPTIMIZERS.get(name)
        assert spec.zeroth_order and not spec.requires_grad
        args = spec.Args()
        assert (args.mu, args.q, args.zo_dist) == (1e-3, 1, "gaussian")
    fo_zo, fo_rs = OPTIMIZERS.get("fo_zo"), OPTIMIZERS.get("fo_rs")
    assert fo_zo.zeroth_order and fo_zo.requires_grad
    assert not fo_rs.zeroth_order and fo_rs.requires_grad
    assert (fo_zo.Args().fo_steps, fo_zo.Args().zo_steps, fo_zo.Args().phases) == (20, 20, None)
    assert (fo_rs.Args().n, fo_rs.Args().sigma) == (3, 1e-4)
    assert isinstance(FakeClosure(Quadratic()), StepClosure)
    with pytest.raises(ConfigError, match="zo_dist"):
        build("zo_sgd", Quadratic(), zo_dist="uniform")


def test_zo_warns_about_parameters_used_outside_their_module(caplog):
    """A parameter read by a parent's forward (not its own module's) cannot be perturbed at use:
    the first step names it in a warning instead of silently estimating 0 for it."""

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.holder = Quadratic(), nn.Linear(2, 1, dtype=torch.float64)

        def forward(self) -> Tensor:
            return self.q() + self.holder.weight.sum()

    model = Parent()
    with caplog.at_level("WARNING", logger="unlearnflow.optim.zeroth_order"):
        zo_step(build("zo_sgd", model, lr=1e-3), FakeClosure(model))
    assert "holder.weight" in caplog.text and "q.first.weight" not in caplog.text
