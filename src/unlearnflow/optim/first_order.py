"""Compressed first-order optimizers (signsgd, signadam, nbit) and the second-order one (sophia).

ALGORITHMS.md §3. Each is a ``torch.optim.Optimizer`` registered under its params.yaml name, with
its own argument section. All of them:

* apply weight decay decoupled, AdamW-style, before the update: θ ← θ(1 − lr·wd), with each param
  group's own ``lr`` and ``weight_decay`` (``param_groups`` in ``optim/__init__.py`` sets wd = 0
  for biases and norm gains);
* skip a parameter whose ``.grad`` is None (no decay, no state), and keep their state in
  ``self.state[p]``, so ``state_dict`` / ``load_state_dict`` resume a run exactly;
* are deterministic (no sampling; ``nbit`` rounds to nearest, ties to even).

The loop drives signsgd, signadam and nbit with one closure call and ``step()`` (seam.py, "first
order, one evaluation"); sophia defines ``gradient(closure)`` to refresh its curvature estimate
first ("first order, several evaluations").

Grades (the third seed's axis, zeroth order → compressed first order → first order → second
order): signsgd, signadam and nbit are *compressed first order*: they use the gradient (and its
momentum) but transmit only 1 bit (the sign) or N bits per coordinate of the direction, so every
coordinate moves by at most lr per step whatever the gradient's scale. sophia is *second order*: it
preconditions the momentum by a diagonal Hessian estimate, moving flat coordinates further and
sharp ones less. The paper that motivates the axis finds second order the *least* robust grade once
the unlearned model is quantized (ALGORITHMS.md §3, last bullet): its curvature-scaled steps reach
sharp, narrow minima of the forget objective that rounding the weights undoes. sophia is kept as that
contrast point, the far end of the axis from the zeroth-order optimizers (``zeroth_order.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from sophia_opt import SophiaG
from torch import Tensor

from unlearnflow.optim import OPTIMIZERS, OptimizerArgs, OptimizerSpec
from unlearnflow.optim.seam import BuildContext, StepClosure

Beta = Annotated[float, Field(ge=0, lt=1)]


def quantize(d: Tensor, bits: int) -> Tensor:
    """Q(d; N): the N-bit symmetric uniform quantization of one tensor, scaled to [−1, 1].

    N = 1: sign(d) (sign(0) = 0). N ≥ 2: L = 2^(N−1) − 1 magnitude levels on each side of zero,
    Q(d) = round(L·d / max|d|) / L, so N = 2 is ternary {−1, 0, 1} and N = 3 is {0, ±1/3, ±2/3, ±1}.
    The largest coordinate maps to ±1, so a step lr·Q(d) moves no coordinate by more than lr.
    max|d| = 0 gives Q = 0. Rounding is deterministic, to nearest with ties to even
    (``torch.round``); stochastic (unbiased) rounding, as in QSGD / TernGrad, is not implemented.

    Args:
        d: the direction, any shape (one parameter's tensor: the scale is per tensor).
        bits: N ≥ 1.

    Returns:
        Tensor of d's shape and dtype with values in {k/L : |k| ≤ L}.
    """
    if bits == 1:
        return d.sign()
    levels = 2 ** (bits - 1) - 1
    scale = d.abs().amax()
    # Dividing by 1 where max|d| = 0 keeps d = 0 at 0 without a host sync on the scale.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(d * levels / safe) / levels


def _run_closure(closure: Any) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _decay_(p: Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay (Loshchilov & Hutter 2019): θ ← θ(1 − lr·wd), before the update."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)


def _momentum_(state: dict[str, Any], p: Tensor, beta1: float) -> Tensor:
    """m ← β1·m + (1 − β1)·g, m = 0 before the first step (Adam's first moment, no bias correction)."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    m = state["exp_avg"]
    return m.mul_(beta1).add_(p.grad, alpha=1 - beta1)


class SignSGD(torch.optim.Optimizer):
    """signSGD: θ ← θ(1 − lr·wd) − lr·sign(g), sign(0) = 0. Keeps no state.

    Bernstein et al. 2018, "signSGD: Compressed Optimisation for Non-Convex Problems", Alg. 1.
    """

    def __init__(self, params: Iterable[Any], *, lr: float, weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"signsgd: lr {lr} and weight_decay {weight_decay} must be ≥ 0")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = _run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _decay_(p, group["lr"], group["weight_decay"])
                p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


class SignAdam(torch.optim.Optimizer):
    """Sign of Adam's direction: m ← β1·m + (1 − β1)·g; θ ← θ(1 − lr·wd) − lr·sign(m).

    Adam's direction is m̂/(√v̂ + ε) with m̂ = m/(1 − β1^t). Since √v̂ + ε > 0 coordinatewise and
    the bias correction 1/(1 − β1^t) is a positive scalar, sign(m̂/(√v̂ + ε)) = sign(m): the sign of
    Adam's step is sign-momentum, "Signum" (Bernstein et al. 2018, "signSGD: Compressed Optimisation
    for Non-Convex Problems", Alg. 3). So no second moment is kept and no bias correction applied;
    the state is m alone. Default β1 = 0.9 (Signum's momentum and Adam's β1).
    """

    def __init__(
        self, params: Iterable[Any], *, lr: float, beta1: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= beta1 < 1:
            raise ValueError(
                f"signadam: need lr, weight_decay ≥ 0 and 0 ≤ beta1 < 1, got {lr}, {weight_decay}, {beta1}"
            )
        super().__init__(params, {"lr": lr, "beta1": beta1, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = _run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                _decay_(p, group["lr"], group["weight_decay"])
                m = _momentum_(self.state[p], p, group["beta1"])
                p.add_(m.sign(), alpha=-group["lr"])
        return loss


class NBit(torch.optim.Optimizer):
    """N-bit compressed direction: θ ← θ(1 − lr·wd) − lr·Q(d; N), Q as in ``quantize`` (per tensor).

    ``direction="momentum"``: d = m, m ← β1·m + (1 − β1)·g (so N = 1 is ``SignAdam`` bit for bit).
    ``direction="adam"``: d = m̂/(√v̂ + ε) with v ← β2·v + (1 − β2)·g² and bias corrections
    m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t) (Kingma & Ba 2015, Alg. 1); v and t are kept only here.
    For N = 1 both directions give the same step (the sign argument in ``SignAdam``); for N ≥ 2 the
    Adam direction's per-coordinate normalisation changes which coordinates reach the top levels.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        bits: int = 2,
        direction: Literal["momentum", "adam"] = "momentum",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if bits < 1 or direction not in ("momentum", "adam") or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"nbit: need bits ≥ 1, direction momentum|adam, betas in [0, 1); got {bits}, {direction}, {betas}"
            )
        if lr < 0 or weight_decay < 0 or eps <= 0:
            raise ValueError(f"nbit: need lr, weight_decay ≥ 0 and eps > 0; got {lr}, {weight_decay}, {eps}")
        defaults = {"lr": lr, "bits": bits, "direction": direction, "betas": tuple(betas), "eps": eps}
        super().__init__(params, {**defaults, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = _run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                _decay_(p, group["lr"], group["weight_decay"])
                m = _momentum_(state, p, beta1)
                d = m
                if group["direction"] == "adam":
                    if "exp_avg_sq" not in state:
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["step"] = 0
                    state["step"] += 1
                    t = state["step"]
                    v = state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                    d = (m / (1 - beta1**t)).div_(denom)
                p.add_(quantize(d, group["bits"]), alpha=-group["lr"])
        return loss


class Sophia(SophiaG):
    """SophiaG, the Gauss-Newton-Bartlett variant, from the authors' code (``sophia-opt``).

    Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training", arXiv:2305.14342, Alg. 3 with the GNB estimator of Alg. 2. Per step t:

        m ← β1·m + (1 − β1)·g
        every k steps:  h ← β2·h + (1 − β2)·ĝ⊙ĝ,  ĝ = ∇ mean over B tokens of CE(f(x), ŷ),
                        ŷ sampled from the model's own softmax (``closure.sampled_backward``)
        θ ← θ(1 − lr·wd) − lr·sign(m)·min(|m| / (ρ·B·h + 1e-15), 1)

    which is the paper's θ − η·clip(m / max(γ·ĥ, ε), 1) with ĥ = B·ĝ⊙ĝ and γ = ρ (the package
    keeps ĝ⊙ĝ in its EMA and multiplies by the latest B at the update; ε enters additively).
    The update, the EMA and the state (``exp_avg``, ``hessian``, ``step``) are the package's; this
    class adds the refresh schedule and remembers B. B is the token count of the latest refresh,
    kept in every param group as ``hessian_bs`` so that ``state_dict`` carries it across a resume
    (1 before the first refresh, where h = 0 and B has no effect). Defaults: betas (0.965, 0.99),
    ρ = 0.04 (the package's), k = 10 (the paper's).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.0,
        hessian_every: int = 10,
    ) -> None:
        if hessian_every < 1:
            raise ValueError(f"sophia: hessian_every must be ≥ 1, got {hessian_every}")
        super().__init__(params, lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay)
        self.hessian_every = hessian_every
        self.defaults["hessian_bs"] = 1
        for group in self.param_groups:
            group.setdefault("hessian_bs", 1)

    def gradient(self, closure: StepClosure) -> None:
        """Refresh h on steps 0, k, 2k, … (GNB probe, then the package's EMA), then ``.grad`` ← ∇L."""
        if closure.step % self.hessian_every == 0:
            tokens = closure.sampled_backward()
            if tokens > 0:  # nothing scored on this step: keep the previous estimate
                self.update_hessian()
                for group in self.param_groups:
                    group["hessian_bs"] = tokens
        closure()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        # The loop calls step() with no arguments (through accelerate's wrapper): pass B here.
        return super().step(closure, bs=self.param_groups[0]["hessian_bs"])


class SignSGDArgs(OptimizerArgs):
    """signsgd has no hyperparameters besides lr and weight decay (Bernstein et al. 2018, Alg. 1)."""


class SignAdamArgs(OptimizerArgs):
    """signadam's momentum; default 0.9, Signum's (Bernstein et al. 2018) and Adam's β1."""

    beta1: float = Field(0.9, ge=0, lt=1, description="momentum β1: m ← β1·m + (1 − β1)·g")


class NBitArgs(OptimizerArgs):
    """nbit's compression. bits = 2 (ternary) is a [choice]: the smallest grade above the sign.

    betas and eps default to Adam's (Kingma & Ba 2015); β2 and eps are used only with
    ``direction: adam``.
    """

    bits: int = Field(2, ge=1, le=16, description="N: 1 = sign, N ≥ 2 = 2^(N−1) − 1 levels per side")
    direction: Literal["momentum", "adam"] = Field(
        "momentum", description="compress the momentum m, or Adam's m̂/(√v̂+ε) (keeps v too)"
    )
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="(β1, β2) of m and v")
    eps: float = Field(1e-8, gt=0, description="Adam's ε (direction: adam only)")


class SophiaArgs(OptimizerArgs):
    """SophiaG's hyperparameters: betas and ρ are the ``sophia-opt`` package's defaults, the
    refresh interval k = 10 is the paper's (Liu et al. 2023, §3 and Alg. 3)."""

    betas: tuple[Beta, Beta] = Field((0.965, 0.99), description="(β1 of m, β2 of the Hessian EMA)")
    rho: float = Field(0.04, gt=0, description="γ: clipping scale, update sign(m)·min(|m|/(ρBh), 1)")
    hessian_every: int = Field(10, ge=1, description="k: refresh the Hessian estimate every k steps")


def _signsgd(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: SignSGDArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return SignSGD(params, lr=lr, weight_decay=weight_decay)


def _signadam(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: SignAdamArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return SignAdam(params, lr=lr, beta1=args.beta1, weight_decay=weight_decay)


def _nbit(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: NBitArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return NBit(
        params,
        lr=lr,
        bits=args.bits,
        direction=args.direction,
        betas=args.betas,
        eps=args.eps,
        weight_decay=weight_decay,
    )


def _sophia(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: SophiaArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return Sophia(
        params,
        lr=lr,
        betas=args.betas,
        rho=args.rho,
        weight_decay=weight_decay,
        hessian_every=args.hessian_every,
    )


OPTIMIZERS.register("signsgd")(OptimizerSpec(SignSGDArgs, _signsgd))
OPTIMIZERS.register("signadam")(OptimizerSpec(SignAdamArgs, _signadam))
OPTIMIZERS.register("nbit")(OptimizerSpec(NBitArgs, _nbit))
OPTIMIZERS.register("sophia")(OptimizerSpec(SophiaArgs, _sophia))
