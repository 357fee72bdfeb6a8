"""Scalarized forget/retain objectives: L = γ·L_f + α·L_r (ALGORITHMS.md §2 "scalarized").

GradAscent is γ=1, α=0 (Jang et al. 2023, arXiv:2210.01504); GradDiff adds a retain term
(Liu et al. 2022, "Continual Learning and Private Unlearning", arXiv:2203.12817; the TOFU
baseline, Maini et al. 2024, arXiv:2401.06121 §4). Later forget losses (NPO, SimNPO, …) plug in
through ``FORGET_LOSSES`` without a new method class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.losses import grad_ascent_loss, kl_retain_loss, nll_loss
from unlearnflow.methods.base import METHODS, Batch, forward_logits, frozen_copy

# name → f(logits, labels, token_weight) for the forget side.
FORGET_LOSSES: dict[str, Callable[..., Tensor]] = {"grad_ascent": grad_ascent_loss}
RETAIN_LOSSES = ("nll", "kl")


class GradAscentArgs(Section):
    gamma: float = Field(1.0, gt=0, description="weight of the forget loss")


class GradDiffArgs(Section):
    gamma: float = Field(1.0, gt=0, description="weight of the forget loss")
    alpha: float = Field(1.0, ge=0, description="weight of the retain loss")
    retain_loss: Literal["nll", "kl"] = "nll"


class Scalarized:
    """γ·L_f(forget batch) + α·L_r(retain batch); the retain stream is skipped when α = 0."""

    Args: ClassVar[type[Section]] = GradDiffArgs
    needs_grad = False
    forget_loss = "grad_ascent"

    def __init__(self, args: Section) -> None:
        self.args = args
        self.gamma: float = args.gamma
        self.alpha: float = getattr(args, "alpha", 0.0)
        self.retain_loss: str = getattr(args, "retain_loss", "nll")
        self.streams: tuple[str, ...] = ("forget", "retain") if self.alpha > 0 else ("forget",)
        self.ref: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module) -> None:
        if self.alpha > 0 and self.retain_loss == "kl":
            self.ref = frozen_copy(model)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        f = batch["forget"]
        forget = FORGET_LOSSES[self.forget_loss](
            forward_logits(model, f), f["labels"], token_weight=f["token_weight"]
        )
        stats = {"forget_loss": forget.item() / f["token_weight"]}
        total = self.gamma * forget
        if self.alpha > 0:
            r = batch["retain"]
            logits = forward_logits(model, r)
            if self.retain_loss == "kl":
                assert self.ref is not None, "setup() builds the reference model"
                with torch.no_grad():
                    ref_logits = forward_logits(self.ref, r)
                retain = kl_retain_loss(logits, ref_logits, r["labels"], token_weight=r["token_weight"])
            else:
                retain = nll_loss(logits, r["labels"], token_weight=r["token_weight"])
            stats["retain_loss"] = retain.item() / r["token_weight"]
            total = total + self.alpha * retain
        return total, stats

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}


@METHODS.register("grad_ascent")
class GradAscent(Scalarized):
    """Gradient ascent on the forget set: L = −NLL(θ; B_f)."""

    Args: ClassVar[type[Section]] = GradAscentArgs


@METHODS.register("grad_diff")
class GradDiff(Scalarized):
    """Gradient difference: L = −γ·NLL(θ; B_f) + α·L_r(θ; B_r), L_r ∈ {nll, kl}."""

    Args: ClassVar[type[Section]] = GradDiffArgs
