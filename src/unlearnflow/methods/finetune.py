"""Supervised fine-tuning: next-token NLL on answer tokens. Trains the target and oracle models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.losses import nll_loss
from unlearnflow.methods.base import METHODS, Batch, TrainContext, forward_logits


class SFTArgs(Section):
    """No hyperparameters: the loss is plain NLL."""


@METHODS.register("sft")
class SFT:
    """Minimise NLL(θ; B) on the ``train`` stream."""

    Args: ClassVar[type[Section]] = SFTArgs
    streams = ("train",)
    needs_grad = False

    def __init__(self, args: SFTArgs) -> None:
        self.args = args

    def setup(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        sub = batch["train"]
        loss = nll_loss(forward_logits(model, sub), sub["labels"], token_weight=sub["token_weight"])
        return loss, {"nll": loss.item() / sub["token_weight"]}

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}
