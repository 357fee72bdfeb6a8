"""The ``Method`` protocol and the registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.registry import Registry

# A micro-batch: one collated sub-batch per data stream ("train", "forget", "retain"), each with
# input_ids, attention_mask, labels and the loop's scalar "token_weight".
Batch = Mapping[str, Mapping[str, Any]]


class Method(Protocol):
    """What the training loop needs from a method.

    Attributes:
        streams: the data streams it consumes; the first one sets the epoch length (the forget
            set for unlearning), the others are sampled alongside it.
        needs_grad: False only for methods whose objective can be optimised from forward passes
            alone; a method that owns backward itself (bilevel) sets True so that zeroth-order
            optimizers are refused up front.
    """

    Args: ClassVar[type[Section]]
    streams: tuple[str, ...]
    needs_grad: bool

    def setup(self, model: torch.nn.Module) -> None:
        """Called once before training (e.g. to freeze a reference copy of ``model``)."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The objective on one micro-batch and the statistics to log (floats)."""

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        """Called once per optimizer step with the step's mean statistics; returns extra stats."""

    def state_dict(self) -> dict[str, Any]:
        """State that a resumed run needs (a dual variable, a penalty coefficient, …)."""


METHODS: Registry[type[Method]] = Registry("method")


def forward_logits(model: torch.nn.Module, sub: Mapping[str, Any]) -> Tensor:
    """Run ``model`` on one collated sub-batch and return its logits (B, T, V)."""
    return model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """π_ref: a frozen copy of the model before unlearning, in eval mode."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
