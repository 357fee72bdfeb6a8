"""Hybrid and smoothed first-order optimizers: ``fo_zo`` and ``fo_rs`` (ALGORITHMS.md §3).

* ``fo_zo`` alternates first-order AdamW phases and zeroth-order R-AdaZO phases (fo_steps : zo_steps,
  1:1 by default, N = 20 steps each: the paper finds 1:1 best and the results insensitive to N),
  aligned from the end of the run so that it always ends on a ZO phase. Which kind a step is comes
  from ``is_zeroth_order_step(step)``; the loop then drives it as seam.py says (one backward and
  ``step()`` for FO, ``step(closure)`` under ``no_grad`` for ZO). Each phase keeps its own moments.
* ``fo_rs`` (randomized smoothing baseline): the gradient averaged over n Gaussian weight
  perturbations θ + σz_i, then an AdamW update. n = 3, σ = 1e-4 are our choice (unpublished).
  The perturbation is applied at use with ``zeroth_order.perturbed`` under autograd: θ + σz is a
  non-leaf of θ, so backward reaches ``θ.grad`` and θ itself is never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from unlearnflow.errors import ConfigError
from unlearnflow.optim import OPTIMIZERS, OptimizerArgs, OptimizerSpec
from unlearnflow.optim.seam import BuildContext, StepClosure
from unlearnflow.optim.zeroth_order import Betas, Dist, ZerothOrder, gaussian, perturbed, zo_kwargs


def fo_zo_is_zeroth_order(
    step: int, *, total: int, fo_steps: int, zo_steps: int, phases: int | None = None
) -> bool:
    """Whether 0-based ``step`` of a ``total``-step fo_zo run is a ZO step.

    Counted from the end (r = total − 1 − step), so the run ends on a ZO phase whatever ``total``:
    without ``phases``, periods of zo_steps ZO then fo_steps FO going backwards (r mod (fo+zo) <
    zo); with ``phases = k``, k pairs of length total/k, each FO then ZO in the fo:zo ratio, in
    exact integer arithmetic. Steps past ``total`` stay in the last (ZO) phase.
    """
    r = total - 1 - step
    if r < 0:
        return True
    if phases is None:
        return r % (fo_steps + zo_steps) < zo_steps
    # Offset from the pair's end, times k: k·(r − j·total/k) with j = ⌊r·k/total⌋.
    offset = r * phases - (r * phases // total) * total
    return offset * (fo_steps + zo_steps) < total * zo_steps


class FoZo(torch.optim.Optimizer):
    """Alternating AdamW (FO) and R-AdaZO (ZO) phases over the same parameters.

    The LR scheduler writes this (outer) optimizer's ``param_groups[i]["lr"]``; every step copies
    it into the AdamW groups and, times zo_lr/lr, into the R-AdaZO groups, so both phases follow
    the schedule and keep their ratio. ``state_dict`` carries both phases' states.

    Args:
        params: parameters or param groups.
        lr: the FO (AdamW) learning rate; zo_lr: the ZO one (None: the same).
        fo_steps, zo_steps, phases: the schedule (``fo_zo_is_zeroth_order``).
        total_steps: the run's optimizer steps (the schedule is aligned from the end).
        betas, eps: shared by both phases; mu, q, zo_dist, model, seed, all_reduce_mean: the ZO
            phase's (``zeroth_order.ZerothOrder``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        weight_decay: float = 0.0,
        zo_lr: float | None = None,
        fo_steps: int = 20,
        zo_steps: int = 20,
        phases: int | None = None,
        total_steps: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        mu: float = 1e-3,
        q: int = 1,
        zo_dist: Dist = "gaussian",
        model: nn.Module,
        seed: int = 0,
        all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.fo_steps, self.zo_steps, self.phases, self.total_steps = fo_steps, zo_steps, phases, total_steps
        self.zo_ratio = (zo_lr if zo_lr is not None else lr) / lr

        def groups() -> list[dict[str, Any]]:
            return [
                dict(params=g["params"], lr=g["lr"], weight_decay=g["weight_decay"])
                for g in self.param_groups
            ]

        self.fo = torch.optim.AdamW(groups(), lr=lr, betas=betas, eps=eps)
        self.zo = ZerothOrder(
            groups(),
            rule="radazo",
            lr=lr * self.zo_ratio,
            betas=betas,
            eps=eps,
            mu=mu,
            q=q,
            zo_dist=zo_dist,
            model=model,
            seed=seed,
            all_reduce_mean=all_reduce_mean,
        )
        self._sync()

    def is_zeroth_order_step(self, step: int) -> bool:
        return fo_zo_is_zeroth_order(
            step, total=self.total_steps, fo_steps=self.fo_steps, zo_steps=self.zo_steps, phases=self.phases
        )

    def _sync(self) -> None:
        for outer, fo, zo in zip(self.param_groups, self.fo.param_groups, self.zo.param_groups, strict=True):
            fo["lr"], zo["lr"] = outer["lr"], outer["lr"] * self.zo_ratio
            fo["weight_decay"] = zo["weight_decay"] = outer["weight_decay"]

    def step(self, closure: StepClosure | None = None) -> Tensor | None:  # type: ignore[override]
        """ZO phase: ``step(closure)`` under no_grad. FO phase: ``step()`` on the gradient in ``.grad``
        (or torch's ``step(closure)`` with gradients enabled)."""
        self._sync()
        if closure is not None and not torch.is_grad_enabled():
            return self.zo.step(closure)
        return self.fo.step(closure)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fo"], sd["zo"] = self.fo.state_dict(), self.zo.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        fo, zo = sd.pop("fo"), sd.pop("zo")
        super().load_state_dict(sd)
        self.fo.load_state_dict(fo)
        self.zo.load_state_dict(zo)


class FoRS(torch.optim.AdamW):
    """AdamW on the randomized-smoothing gradient (1/n)·Σ_i ∇L(θ + σz_i), z_i ~ N(0, I).

    ``gradient(closure)`` (seam.py ``GradientBuilder``) evaluates the closure with backward n times
    under the at-use perturbation θ + σz_i, z_i drawn from (seed, closure.step, i, parameter index),
    and leaves the mean in ``.grad``; the loop then clips it once and steps. The closure resets
    ``.grad`` itself, so each call's gradient is moved aside before the next.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        n: int = 3,
        sigma: float = 1e-4,
        model: nn.Module,
        seed: int = 0,
        **adamw: Any,
    ) -> None:
        super().__init__(params, **adamw)
        self.n, self.sigma, self.model, self.seed = n, sigma, model, seed

    def gradient(self, closure: StepClosure) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        total: list[Tensor | None] = [None] * len(params)
        for i in range(self.n):

            def z(j: int, p: Tensor, i: int = i) -> Tensor:
                return gaussian(self.seed, closure.step, i, j, p)

            with perturbed(self.model, params, self.sigma, z):
                closure()
            for j, p in enumerate(params):
                if p.grad is None:
                    continue
                # A copy, not the tensor itself: DDP may hand out bucket views it overwrites.
                total[j] = p.grad.detach().clone() if total[j] is None else total[j].add_(p.grad)
                p.grad = None
        for p, g in zip(params, total, strict=True):
            p.grad = None if g is None else g.div_(self.n)


class FoZoArgs(OptimizerArgs):
    """``fo_zo``: FO:ZO = 1:1 and N = 20 (the paper: 1:1 best, insensitive to N); R-AdaZO's ZO phase
    with MeZO's μ = 1e-3, q = 1, Gaussian; Adam's public betas and ε for both phases. ``zo_lr``
    null uses the FO rate (both phases take normalised, Adam-like steps) [choice]."""

    fo_steps: int = Field(
        20, ge=1, description="first-order (AdamW) steps per phase pair (the ratio's FO part)"
    )
    zo_steps: int = Field(
        20, ge=1, description="zeroth-order (R-AdaZO) steps per phase pair (the ratio's ZO part)"
    )
    phases: int | None = Field(
        None, ge=1, description="null: phases of fo_steps/zo_steps; k: k FO+ZO pairs spread over the run"
    )
    zo_lr: float | None = Field(
        None, gt=0, description="ZO phase learning rate (follows the same schedule); null: lr"
    )
    betas: Betas = Field((0.9, 0.999), description="moment decay rates (β₁, β₂), each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="denominator guard ε")
    mu: float = Field(1e-3, gt=0, description="ZO perturbation scale μ")
    q: int = Field(1, ge=1, description="ZO directions per step")
    zo_dist: Dist = Field("gaussian", description="ZO direction law: gaussian (φ = 1) or sphere (φ = d)")


class FoRSArgs(OptimizerArgs):
    """``fo_rs``: n = 3 perturbations of std σ = 1e-4 (ALGORITHMS.md §3: unpublished, our choice);
    Adam's public betas and ε for the AdamW update."""

    n: int = Field(3, ge=1, description="Gaussian weight perturbations averaged per step")
    sigma: float = Field(1e-4, ge=0, description="perturbation standard deviation σ (0: plain AdamW)")
    betas: Betas = Field((0.9, 0.999), description="AdamW moment decay rates, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW denominator guard ε")


def _fo_zo(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: FoZoArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    if ctx.total_steps is None:
        raise ValueError(
            "fo_zo aligns its schedule to the end of the run: BuildContext.total_steps is required"
        )
    if args.phases is not None and 2 * args.phases > ctx.total_steps:
        raise ConfigError(
            f"unlearn.optimizer_args.fo_zo.phases: {args.phases} FO+ZO pairs need at least "
            f"{2 * args.phases} steps; the run has {ctx.total_steps}"
        )
    return FoZo(
        params,
        lr=lr,
        weight_decay=weight_decay,
        zo_lr=args.zo_lr,
        fo_steps=args.fo_steps,
        zo_steps=args.zo_steps,
        phases=args.phases,
        total_steps=ctx.total_steps,
        betas=args.betas,
        eps=args.eps,
        **zo_kwargs(args, ctx),
    )


def _fo_rs(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: FoRSArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return FoRS(
        params,
        n=args.n,
        sigma=args.sigma,
        model=ctx.model,
        seed=ctx.seed,
        lr=lr,
        weight_decay=weight_decay,
        betas=args.betas,
        eps=args.eps,
    )


OPTIMIZERS.register("fo_zo")(OptimizerSpec(FoZoArgs, _fo_zo, requires_grad=True, zeroth_order=True))
OPTIMIZERS.register("fo_rs")(OptimizerSpec(FoRSArgs, _fo_rs))
