"""The ``Method`` protocol, the context the training loop hands a method, and the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from pydantic import Field
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.registry import Registry

# A micro-batch: one collated sub-batch per data stream ("train", "forget", "retain", …), each with
# input_ids, attention_mask, labels and the loop's scalars "token_weight" (for token means) and
# "seq_weight" (for sequence means): see the module docstring of ``unlearnflow.losses``.
Batch = Mapping[str, Mapping[str, Any]]


class MethodArgs(Section):
    """Keys every method accepts besides its own hyperparameters.

    Methods need learning rates and lengths orders of magnitude apart (RMU vs NPO vs a bilevel
    method), so each may override ``unlearn.lr`` / ``unlearn.epochs``; an optimizer's own ``lr`` /
    ``epochs`` (``unlearn.optimizer_args.<name>``) take precedence over the method's.
    """

    lr: float | None = Field(None, gt=0, description="this method's learning rate; null: unlearn.lr")
    epochs: float | None = Field(None, gt=0, description="this method's epochs; null: unlearn.epochs")


@dataclass(frozen=True)
class TrainContext:
    """What the loop tells a method in ``setup``.

    Attributes:
        device: where the model and batches live.
        steps_per_epoch: optimizer steps per pass over the first stream.
        total_steps: optimizer steps of the whole run.
        grad_accum_steps: micro-batches per optimizer step.
        all_reduce_mean: mean of a float over the processes (identity on one process), so that a
            quantity a method steers by (PDU's retain loss) is the same on every process.
        batches: ``batches(stream)`` iterates one pass over a stream, in a fixed order, as collated
            micro-batches on ``device`` (for measurements before training, e.g. ``retain_eps: auto``).
    """

    device: torch.device
    steps_per_epoch: int
    total_steps: int
    grad_accum_steps: int
    all_reduce_mean: Callable[[float], float]
    batches: Callable[[str], Iterator[Mapping[str, Any]]]


class Method(Protocol):
    """What the training loop needs from a method.

    Attributes:
        streams: the data streams it consumes; the first one sets the epoch length (the forget
            set for unlearning), the others are sampled alongside it.
        paired_streams: stream → partner stream drawn in lockstep with it (same order, same
            length): idk_dpo's refusal answers pair with the forget questions they replace.
        needs_grad: False only for methods whose objective can be optimised from forward passes
            alone; a method that owns backward itself (bilevel) sets True so that zeroth-order
            optimizers are refused up front.
        owns_backward: True for a method whose step is not "backward of a loss" (OFMU): the loop's
            closure calls ``compute_gradients`` instead of ``loss`` + backward.
    """

    Args: ClassVar[type[Section]]
    streams: tuple[str, ...]
    needs_grad: bool

    def setup(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        """Called once before training (e.g. to freeze a reference copy of ``model``)."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The objective on one micro-batch and the statistics to log (floats)."""

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        """Called once per optimizer step with the step's mean statistics; returns extra stats."""

    def state_dict(self) -> dict[str, Any]:
        """State that a resumed run needs (a dual variable, a penalty coefficient, …)."""


class OwnsBackward(Protocol):
    """The extra hook of a method with ``owns_backward = True``."""

    def compute_gradients(
        self, model: torch.nn.Module, micro: Sequence[Batch]
    ) -> tuple[Tensor, dict[str, float]]:
        """Leave in each trainable parameter's ``.grad`` the direction the optimizer should descend.

        Called by the closure with the step's micro-batches; returns the loss to log and the stats.
        The loop clips the gradient afterwards and lets the optimizer step.
        """


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
