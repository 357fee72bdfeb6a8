"""The identity attack and Gaussian weight noise (ALGORITHMS.md §4 "noise")."""

from __future__ import annotations

from typing import ClassVar

import torch

from unlearnflow.attacks import ATTACKS, AttackContext
from unlearnflow.config import NoAttackConfig, NoiseAttackConfig, Section


@ATTACKS.register("none")
class NoAttack:
    """The unlearned model as it is: the baseline every attack is compared with."""

    Args: ClassVar[type[Section]] = NoAttackConfig
    modifies_weights: ClassVar[bool] = False

    def __init__(self, args: NoAttackConfig) -> None:
        self.args = args

    def apply(self, model: torch.nn.Module, ctx: AttackContext) -> dict[str, float]:
        return {}


@torch.no_grad()
def add_relative_noise(model: torch.nn.Module, *, sigma: float, seed: int) -> float:
    """W ← W + σ·rms(W)·ε, ε ~ N(0, I), for every weight matrix (ndim ≥ 2) of ``model``.

    Norm gains and biases (ndim < 2) are left alone: relative noise on a vector of ones is a
    different perturbation from noise on a matrix, and the probe is about the weight matrices.
    Noise is drawn on the CPU from one seeded generator in parameter order, so the same seed gives
    the same perturbation on any device. Tied weights are perturbed once.

    Returns:
        The mean relative perturbation ‖ΔW‖/‖W‖ over the perturbed tensors (≈ σ).
    """
    gen = torch.Generator().manual_seed(seed)
    ratios = []
    seen: set[int] = set()
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        rms = p.float().pow(2).mean().sqrt()
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (sigma * rms.cpu())
        p.add_(noise.to(p.device, p.dtype))
        ratios.append(float(noise.norm() / (p.float().norm().cpu() + 1e-12)))
    return sum(ratios) / max(1, len(ratios))


@ATTACKS.register("noise")
class NoiseAttack:
    """A cheap perturbation probe: does forgetting survive a small random move of the weights?"""

    Args: ClassVar[type[Section]] = NoiseAttackConfig
    modifies_weights: ClassVar[bool] = True

    def __init__(self, args: NoiseAttackConfig) -> None:
        self.args = args

    def apply(self, model: torch.nn.Module, ctx: AttackContext) -> dict[str, float]:
        return {"relative_noise": add_relative_noise(model, sigma=self.args.sigma, seed=self.args.seed)}
