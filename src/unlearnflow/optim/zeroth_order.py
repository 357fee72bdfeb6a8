"""Zeroth-order optimizers: ``zo_sgd``, ``zo_adam``, ``zo_radazo`` (ALGORITHMS.md §3).

The estimator is the central difference over q random directions (MeZO, Malladi et al. 2023,
arXiv:2305.17333, Alg. 1; ZO-Bench, Zhang et al. 2024, arXiv:2402.11592):

    c_i = (L(θ + μu_i) − L(θ − μu_i)) / (2μ),        ĝ = (φ/q)·Σ_i c_i·u_i.

Scale convention (it sets the effective learning rate): for ``zo_dist: gaussian`` u ~ N(0, I) and
φ = 1, since E[uuᵀ] = I makes E[(∇L·u)u] = ∇L; for ``zo_dist: sphere`` u is uniform on the unit
sphere of all d optimised coordinates (a Gaussian draw divided by its global norm), E[uuᵀ] = I/d,
and φ = d makes ĝ unbiased for the gradient of the sphere-smoothed loss. Either way E[ĝ] = ∇L to
O(μ²), so the two distributions share learning rates; their variances differ: E‖ĝ − ∇L‖² is
(d + 1)‖∇L‖²/q (Gaussian) and (d − 1)‖∇L‖²/q (sphere) on a quadratic.

**Why the perturbation is applied at use, not in place.** MeZO writes θ += μu, θ −= 2μu, θ += μu
into the weights and relies on the last write to restore them. In floating point
fl(fl(fl(θ + d) − 2d) + d) ≠ θ in general (rounding is not invertible), so the weights drift by a
few ulps per step, and "the parameters equal the start plus the update exactly" cannot hold without
keeping a copy of θ, which doubles the memory a ZO step is meant to save. Here θ is never written
during the evaluations: :func:`perturbed` installs forward pre-hooks on every module that directly
owns an optimised parameter; the pre-hook swaps the ``nn.Parameter`` for the out-of-place tensor
θ_p + c·u_p (u_p regenerated from its seed) and a forward hook puts the ``nn.Parameter`` back. The
restore is exact by construction, ``p._version`` does not move until the update, and the extra
memory at any moment is one module's parameters (plus one direction), not the model's. Tied weights
(``embed_tokens`` and ``lm_head`` sharing one Parameter) see the same u because the generator is
keyed by the parameter's index in the optimizer's list, not by the module. Limits: a parameter read
outside its own module's ``forward`` (``model.embed.weight`` used directly by a parent) is not
perturbed (a warning names it), and activation recomputation (gradient checkpointing) after the
block has exited would see the unperturbed weights.

Directions are never stored: u_i of ZO step t is drawn from a ``torch.Generator`` seeded by
(ctx.seed, t, i, parameter index), identically on every data-parallel process, and regenerated for
the + evaluation, the − evaluation and the update replay. The q projected differences c_i are
averaged across processes (``ctx.all_reduce_mean``) before any update, so replicas never drift. The
update is applied parameter by parameter while replaying the directions, so ĝ is never materialised
for the whole model; its exact norm is accumulated on the way and reported as ``grad_norm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import struct
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from unlearnflow.optim import OPTIMIZERS, OptimizerArgs, OptimizerSpec
from unlearnflow.optim.seam import BuildContext, StepClosure

log = logging.getLogger(__name__)

Dist = Literal["gaussian", "sphere"]


def _unit_betas(betas: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in betas):
        raise ValueError("each beta must lie in [0, 1)")
    return betas


Betas = Annotated[tuple[float, float], AfterValidator(_unit_betas)]


# --------------------------------------------------------------------------------------------------
# Directions and the at-use perturbation (reused by hybrid.fo_rs)


def direction_seed(seed: int, step: int, i: int, index: int) -> int:
    """A 63-bit generator seed from (run seed, step, direction, parameter index).

    A hash, not arithmetic, so nearby tuples give unrelated streams; identical on every process
    and Python version (no ``hash()``, whose value for tuples is not a documented constant).
    """
    digest = hashlib.blake2b(struct.pack("<4q", seed, step, i, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Scratch:
    """Flat buffers reused across module forwards and steps, one per role (and dtype, device).

    Why: a ZO step regenerates every block of u five times (two streams × ±μ, plus the update's
    replay) and builds θ + c·u for every module. Into fresh tensors, each multi-MiB block is a new
    mapping whose pages fault in while the generator writes: on the 2-core CPU machine
    ``torch.randn`` into fresh memory costs ~10 ns per element against ~4.5 ns for ``normal_``
    into warm memory (docs/optimizer-step-cost.md). The buffers hold the largest parameter once per
    role, not the model. ``like`` returns a view that the next call with the same role overwrites.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Hashable, torch.dtype, torch.device], Tensor] = {}

    def like(self, role: Hashable, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised contiguous tensor shaped like ``t`` (dtype ``dtype`` or ``t``'s)."""
        key = (role, dtype or t.dtype, t.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < t.numel():
            buf = self._buffers[key] = torch.empty(t.numel(), dtype=key[1], device=t.device)
        return buf[: t.numel()].view(t.shape)

    def holds(self, t: Tensor) -> bool:
        """Whether ``t`` shares memory with one of the buffers (an output aliasing a weight)."""
        ptr = t.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self._buffers.values())


def gaussian(seed: int, step: int, i: int, index: int, like: Tensor, out: Tensor | None = None) -> Tensor:
    """z ~ N(0, I) with ``like``'s shape, dtype and device, from ``direction_seed(seed, step, i, index)``.

    Written into ``out`` when given (the same numbers: ``randn`` is ``empty`` + ``normal_``).
    """
    gen = torch.Generator(device=like.device).manual_seed(direction_seed(seed, step, i, index))
    if out is not None:
        return out.normal_(generator=gen)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)


def sphere_scale(
    seed: int, step: int, i: int, params: Sequence[Tensor], scratch: Scratch | None = None
) -> float:
    """1/‖z‖ over *all* optimised parameters (one extra generation pass), so z·scale is on the sphere."""
    norms = [
        torch.linalg.vector_norm(
            gaussian(seed, step, i, j, p, None if scratch is None else scratch.like("u", p)),
            dtype=torch.float64,
        )
        for j, p in enumerate(params)
    ]
    return 1.0 / math.sqrt(math.fsum(float(n) ** 2 for n in norms))


def direction(
    seed: int,
    step: int,
    i: int,
    dist: Dist,
    params: Sequence[Tensor],
    scratch: Scratch | None = None,
) -> Callable[[int, Tensor], Tensor]:
    """u_i of step ``step`` as a function (parameter index, parameter) → its block of u_i.

    With ``scratch`` the block is a view of the ``"u"`` buffer, valid until the next call.
    """
    scale = sphere_scale(seed, step, i, params, scratch) if dist == "sphere" else 1.0

    def u(j: int, p: Tensor) -> Tensor:
        z = gaussian(seed, step, i, j, p, None if scratch is None else scratch.like("u", p))
        return z.mul_(scale) if dist == "sphere" else z

    return u


@contextlib.contextmanager
def perturbed(
    model: nn.Module,
    params: Sequence[Tensor],
    coeff: float,
    offset: Callable[[int, Tensor], Tensor],
    scratch: Scratch | None = None,
) -> Iterator[set[int]]:
    """Within the block, every forward of a module owning ``params[j]`` sees θ_j + coeff·offset(j, θ_j).

    θ is never written: a forward pre-hook swaps the module's ``nn.Parameter`` for the out-of-place
    tensor and a forward hook restores it (see the module docstring). Under autograd the swapped
    tensor is a non-leaf of θ, so a backward run inside or after the block reaches ``θ.grad``
    (randomized smoothing, ``hybrid.fo_rs``).

    Args:
        model: the (unwrapped) model whose modules own ``params``.
        params: the optimised parameters, in the optimizer's order (index j keys the direction).
        coeff: the step along the offset (+μ, −μ, σ).
        offset: (j, θ_j) → a tensor shaped like θ_j, regenerated at each use.
        scratch: where θ_j + coeff·offset is written when grad is disabled (one buffer per
            parameter name and module nesting depth, reused by the next module); under autograd
            the tensor is always fresh, since the graph keeps it for backward. A module output
            that aliases its perturbed weight is cloned before the buffer is reused.

    Yields:
        The set of indices j whose parameter was used inside a module forward (filled as it runs).
    """
    index = {id(p): j for j, p in enumerate(params)}
    applied: set[int] = set()
    swapped: dict[tuple[int, str], tuple[nn.Module, nn.Parameter]] = {}
    depth = [0]
    handles = []

    def pre_hook(module: nn.Module, _args: Any) -> None:
        reuse = scratch is not None and not torch.is_grad_enabled()
        for name, p in list(module._parameters.items()):
            j = index.get(id(p)) if p is not None else None
            if j is None:
                continue
            swapped[(id(module), name)] = (module, p)
            out = scratch.like(("theta", depth[0], name), p) if reuse else None  # type: ignore[union-attr]
            # Bypasses Module.__setattr__, which accepts only Parameters here; restored below.
            module._parameters[name] = torch.add(p, offset(j, p), alpha=coeff, out=out)
            applied.add(j)
        depth[0] += 1

    def post_hook(module: nn.Module, _args: Any, out: Any) -> Any:
        depth[0] -= 1
        for name in list(module._parameters):
            entry = swapped.pop((id(module), name), None)
            if entry is not None:
                module._parameters[name] = entry[1]
        if scratch is None:
            return None
        if isinstance(out, Tensor):
            return out.clone() if scratch.holds(out) else None
        if isinstance(out, tuple) and any(isinstance(o, Tensor) and scratch.holds(o) for o in out):
            return tuple(o.clone() if isinstance(o, Tensor) and scratch.holds(o) else o for o in out)
        return None

    for module in model.modules():
        if any(p is not None and id(p) in index for p in module._parameters.values()):
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook, prepend=True))
    try:
        yield applied
    finally:
        for h in handles:
            h.remove()
        # A forward that raised never reached its forward hook: put those Parameters back too.
        for (_, name), (module, p) in swapped.items():
            module._parameters[name] = p
        swapped.clear()
        depth[0] = 0


# --------------------------------------------------------------------------------------------------
# The optimizers


def sgd_update(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> None:
    """ZO-SGD (MeZO, Malladi et al. 2023, arXiv:2305.17333, Alg. 1): θ ← θ(1 − lr·wd) − lr·ĝ."""
    lr, wd = group["lr"], group["weight_decay"]
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(g.to(p.dtype), alpha=-lr)


def _moments(p: Tensor, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    if not state:
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    return state["exp_avg"], state["exp_avg_sq"]


def adam_update(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> None:
    """ZO-Adam (ZO-AdaMM, Chen et al. 2019, arXiv:1910.06513; ZO-Bench's ZO-Adam): ĝ into AdamW.

    m ← β₁m + (1−β₁)ĝ; v ← β₂v + (1−β₂)ĝ²; θ ← θ(1 − lr·wd) − lr·m̂/(√v̂ + ε) with Adam's bias
    corrections m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ) (torch's AdamW arithmetic).
    """
    (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
    m, v = _moments(p, state)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if wd:
        p.mul_(1 - lr * wd)
    denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def radazo_update(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> None:
    """R-AdaZO (Shu et al., ICML 2025, "Refining Adaptive Zeroth-Order Optimization at Ease", Alg. 1).

    m ← β₁m + (1−β₁)ĝ; v ← β₂v + (1−β₂)m² (the second moment of the *momentum*, whose variance is
    lower than ĝ's); θ ← θ(1 − lr·wd) − lr·m/(√v + ε).

    Bias correction: none, as in the paper's Algorithm 1 (the update its convergence analysis is
    for) and its official implementation. Adam's 1/(1−βᵗ) factors would not be the right ones here
    anyway, since v averages m², itself a biased average. Consequence: the first update moves each
    coordinate by lr·sign(ĝ)/√(1−β₂) (≈ 31.6·lr at β₂ = 0.999), shrinking as v fills.
    """
    (b1, b2), eps, lr, wd = group["betas"], group["eps"], group["lr"], group["weight_decay"]
    m, v = _moments(p, state)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(m, m, value=1 - b2)
    if wd:
        p.mul_(1 - lr * wd)
    p.addcdiv_(m, v.sqrt().add_(eps), value=-lr)


Rule = Callable[[Tensor, Tensor, dict[str, Any], dict[str, Any], int], None]
RULES: dict[str, Rule] = {"sgd": sgd_update, "adam": adam_update, "radazo": radazo_update}


class ZerothOrder(torch.optim.Optimizer):
    """Central-difference ZO estimate over q seeded directions, fed per parameter to an update rule.

    ``step(closure)`` must run under ``torch.no_grad`` (the loop guarantees it): it calls the closure
    2q times at θ ± μu_i, averages the q projected differences across processes, replays the
    directions parameter by parameter to build that parameter's block of ĝ and applies ``rule``
    (``sgd``, ``adam``, ``radazo``: the functions above) to it, reports ``grad_norm = ‖ĝ‖`` and
    returns the mean of the 2q evaluations (the loss at θ to O(μ²)). The ZO step counter t (it
    seeds the directions and drives bias corrections) lives in every param group as ``zo_step``,
    so ``state_dict`` round-trips it with the moments.

    Args:
        params: parameters or param groups (``lr``, ``weight_decay`` per group).
        rule: the update fed with ĝ.
        mu, q, zo_dist: perturbation scale, directions per step, direction law.
        model: the unwrapped model owning ``params`` (its modules are hooked, see ``perturbed``).
        seed: the run's seed; directions are keyed by (seed, t, i, parameter index).
        all_reduce_mean: mean over data-parallel processes of the projected differences.
        betas, eps: moment rates and guard (adam, radazo).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        rule: str,
        lr: float,
        weight_decay: float = 0.0,
        mu: float = 1e-3,
        q: int = 1,
        zo_dist: Dist = "gaussian",
        model: nn.Module,
        seed: int = 0,
        all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if rule not in RULES or mu <= 0 or q < 1 or zo_dist not in ("gaussian", "sphere"):
            raise ValueError(f"bad ZO settings: rule={rule!r}, mu={mu}, q={q}, zo_dist={zo_dist!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, zo_step=0)
        super().__init__(params, defaults)
        self.rule, self.mu, self.q, self.zo_dist = rule, mu, q, zo_dist
        self.model, self.seed, self.all_reduce_mean = model, seed, all_reduce_mean
        self._warned = False
        self._scratch = Scratch()

    def is_zeroth_order_step(self, step: int) -> bool:
        return True

    def step(self, closure: StepClosure | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("a zeroth-order optimizer evaluates the loss itself: step() needs a closure")
        assert not torch.is_grad_enabled(), "a zeroth-order step runs under torch.no_grad"
        params = [p for g in self.param_groups for p in g["params"]]
        t = int(self.param_groups[0]["zo_step"])
        mu, q = self.mu, self.q
        phi = float(sum(p.numel() for p in params)) if self.zo_dist == "sphere" else 1.0
        scratch = self._scratch
        us = [direction(self.seed, t, i, self.zo_dist, params, scratch) for i in range(q)]

        losses: list[Tensor] = []
        diffs: list[Tensor] = []
        used: set[int] = set()
        for u in us:
            with perturbed(self.model, params, mu, u, scratch) as applied:
                plus = closure()
            used |= applied
            with perturbed(self.model, params, -mu, u, scratch) as applied:
                minus = closure()
            used |= applied
            losses += [plus.detach().reshape(()), minus.detach().reshape(())]
            diffs.append((plus.double() - minus.double()).reshape(()) / (2 * mu))
        if len(used) < len(params) and not self._warned:
            self._warned = True
            names = {id(p): n for n, p in self.model.named_parameters()}
            unused = [names.get(id(p), f"#{j}") for j, p in enumerate(params) if j not in used]
            log.warning(
                "zeroth-order step: %d optimised parameters were not used inside their own module's "
                "forward, so their directional derivatives read 0: %s",
                len(unused),
                ", ".join(unused[:5]) + (", …" if len(unused) > 5 else ""),
            )
        # Every process must update with the same coefficients, or replicas drift.
        weights = (self.all_reduce_mean(torch.stack(diffs)) * (phi / q)).tolist()

        update = RULES[self.rule]
        norms: list[Tensor] = []
        j = 0
        for group in self.param_groups:
            for p in group["params"]:
                acc = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                g = scratch.like("g", p, dtype=acc).zero_()
                for u, w in zip(us, weights, strict=True):
                    g.add_(u(j, p), alpha=w)
                norms.append(torch.linalg.vector_norm(g, dtype=torch.float64))
                update(p, g, self.state[p], group, t + 1)
                j += 1
        for group in self.param_groups:
            group["zo_step"] = t + 1
        closure.report(grad_norm=math.sqrt(math.fsum(float(n) ** 2 for n in norms)))
        return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------------
# params.yaml sections and registration


class ZOSGDArgs(OptimizerArgs):
    """``zo_sgd``: defaults are MeZO's public ones (μ = 1e-3, q = 1, Gaussian; ALGORITHMS.md §3).

    Full-parameter ZO on LLMs uses lr ~1e-7…1e-6 (MeZO OPT-13B: 1e-7), far below first-order rates.
    """

    mu: float = Field(1e-3, gt=0, description="perturbation scale μ of the central difference")
    q: int = Field(1, ge=1, description="random directions per step (2q forward passes)")
    zo_dist: Dist = Field("gaussian", description="direction law: gaussian (φ = 1) or sphere (φ = d)")


class ZOAdamArgs(ZOSGDArgs):
    """``zo_adam`` / ``zo_radazo``: Adam's public betas and ε (Kingma & Ba 2015), used by R-AdaZO too."""

    betas: Betas = Field((0.9, 0.999), description="moment decay rates (β₁, β₂), each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="denominator guard ε")


def zo_kwargs(args: Any, ctx: BuildContext) -> dict[str, Any]:
    """The estimator's keyword arguments from any args section with ``mu``, ``q``, ``zo_dist``."""
    return dict(
        mu=args.mu,
        q=args.q,
        zo_dist=args.zo_dist,
        model=ctx.model,
        seed=ctx.seed,
        all_reduce_mean=ctx.all_reduce_mean,
    )


def _zo_sgd(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: ZOSGDArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return ZerothOrder(params, rule="sgd", lr=lr, weight_decay=weight_decay, **zo_kwargs(args, ctx))


def _adaptive(rule: str) -> Callable[..., torch.optim.Optimizer]:
    """The factory of an adaptive ZO rule (``adam``, ``radazo``): the same arguments, another update."""

    def factory(
        params: Iterable[Any], *, lr: float, weight_decay: float, args: ZOAdamArgs, ctx: BuildContext
    ) -> torch.optim.Optimizer:
        return ZerothOrder(
            params,
            rule=rule,
            lr=lr,
            weight_decay=weight_decay,
            betas=args.betas,
            eps=args.eps,
            **zo_kwargs(args, ctx),
        )

    return factory


_zo_adam, _zo_radazo = _adaptive("adam"), _adaptive("radazo")


OPTIMIZERS.register("zo_sgd")(OptimizerSpec(ZOSGDArgs, _zo_sgd, requires_grad=False, zeroth_order=True))
OPTIMIZERS.register("zo_adam")(OptimizerSpec(ZOAdamArgs, _zo_adam, requires_grad=False, zeroth_order=True))
OPTIMIZERS.register("zo_radazo")(
    OptimizerSpec(ZOAdamArgs, _zo_radazo, requires_grad=False, zeroth_order=True)
)
