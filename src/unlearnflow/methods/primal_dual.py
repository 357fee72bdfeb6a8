"""PDU: primal-dual constrained unlearning with the logit-margin flattening loss (ALGORITHMS.md §2).

    minimise γ·L_flatten(θ; B_f)   subject to   L_r(θ; B_r) ≤ ε

Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language
Models", arXiv:2506.05314. The primal step is one optimizer step on the Lagrangian
γ·L_f + λ·(L_r − ε) with λ held constant; the dual step is projected gradient ascent
λ ← max(0, λ + η_λ·(L_r − ε)), so λ grows while the retain constraint is violated and shrinks back
(to 0 if it stays satisfied) once it holds. λ's trajectory is the method's diagnostic: it is logged
every step and saved in ``state_dict``.

Deviations from open-unlearning's ``PDU`` (src/trainer/unlearn/pdu.py), each a parameter here:

* the dual step runs once per optimizer step on the step's token-mean retain loss
  (``dual_update: step``, default); the reference updates inside ``compute_loss``, once per
  micro-batch (``dual_update: microbatch`` reproduces it, but counts each micro-batch once even
  when an optimizer evaluates the closure several times);
* the retain loss that drives the dual step is all-reduced across processes, so every process
  holds the same λ (the reference lets each rank drift);
* ``dual_update: epoch`` averages the retain losses of the epoch's steps instead of running an
  extra pass over the training loader;
* the flattening loss defaults to the shifted answer mask with a per-sequence mean (see
  ``losses.flatten_loss``); ``mask_alignment: unshifted, reduction: per_token`` is the reference's;
* ``retain_eps: auto`` sets ε = (1 + tol)·(retain loss of the starting model), the rule the
  authors' README gives in words ("look at the retain loss of the pretrained model and choose an
  appropriately larger value").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.errors import DataError
from unlearnflow.losses import flatten_loss, kl_retain_loss, nll_loss, sequence_nll
from unlearnflow.methods.base import (
    METHODS,
    Batch,
    MethodArgs,
    TrainContext,
    forward_logits,
    frozen_copy,
)


class PrimalDualArgs(MethodArgs):
    """PDU's hyperparameters; defaults are the public TOFU recipe (community/methods/PDU/run.sh)."""

    gamma: float = Field(1.0, gt=0, description="weight γ of the flattening forget loss")
    retain_loss: Literal["nll", "kl"] = Field(
        "nll", description="L_r: NLL on the retain batch, or KL(π_ref ‖ π_θ) to the starting model"
    )
    mask_alignment: Literal["shifted", "unshifted", "all_positions"] = Field(
        "shifted", description="positions the flattening loss scores (losses.flatten_loss)"
    )
    reduction: Literal["per_sequence", "per_token"] = Field(
        "per_sequence", description="flattening loss mean over sequences or over tokens"
    )
    retain_eps: float | Literal["auto"] = Field(
        0.3, description="ε of L_r ≤ ε (nats/token), or auto: (1 + retain_eps_tol)·L_r of the start"
    )
    retain_eps_tol: float = Field(0.1, ge=0, description="relative slack of retain_eps: auto")
    dual_init: float = Field(100.0, ge=0, description="λ₀, the starting dual variable")
    dual_lr: float = Field(5.0, ge=0, description="η_λ, the dual ascent step size")
    dual_update: Literal["step", "microbatch", "epoch"] = Field(
        "step", description="when λ moves: per optimizer step, per micro-batch, per epoch"
    )
    dual_warmup_epochs: float = Field(
        5.0, ge=0, description="epochs with λ held at dual_init before dual ascent starts"
    )

    @field_validator("retain_eps", mode="before")
    @classmethod
    def _eps_number_or_auto(cls, value: Any) -> float | str:
        # One check instead of a pydantic union, whose errors name the union's members, not the key.
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise ValueError("retain_eps must be a finite number >= 0 or 'auto'")
        return float(value)

    @model_validator(mode="after")
    def _auto_needs_nll(self) -> PrimalDualArgs:
        # KL(π_ref ‖ π_θ) of the starting model is exactly 0, so "auto" would demand KL ≤ 0: a
        # constraint never satisfied, and λ would grow without bound.
        if self.retain_eps == "auto" and self.retain_loss == "kl":
            raise ValueError(
                "pdu: retain_eps: auto needs retain_loss: nll (the starting model's KL to itself is 0, "
                "so ε would be 0); give retain_eps a number"
            )
        return self


def starting_retain_nll(model: torch.nn.Module, ctx: TrainContext) -> float:
    """Token-mean NLL of ``model`` over one pass of the retain stream (no grad, eval mode).

    The exact mean over all answer tokens of the stream (Σ seqNLL / Σ tokens), not a mean of batch
    means, then averaged across processes so that every process derives the same ε.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for sub in ctx.batches("retain"):
            seq, n = sequence_nll(forward_logits(model, sub), sub["labels"])
            total, count = total + float(seq.sum()), count + float(n.sum())
    model.train(was_training)
    if count == 0:
        raise DataError("pdu: retain_eps: auto found no answer tokens in the retain stream")
    return ctx.all_reduce_mean(total / count)


@METHODS.register("pdu")
class PrimalDual:
    """γ·L_flatten(B_f) + λ·(L_r(B_r) − ε) per micro-batch, λ by projected dual ascent."""

    Args: ClassVar[type[Section]] = PrimalDualArgs
    streams = ("forget", "retain")
    needs_grad = False  # the Lagrangian is an ordinary loss: zeroth-order optimizers may run it

    def __init__(self, args: PrimalDualArgs) -> None:
        self.args = args
        self.lam: float = args.dual_init
        # ε is a number, or None until ``setup`` measures it (retain_eps: auto).
        self.eps: float | None = None if args.retain_eps == "auto" else float(args.retain_eps)
        self.step = 0  # optimizer steps taken
        self.dual_updates = 0  # how many times λ moved (or was projected), for the log and tests
        self.epoch_sum, self.epoch_steps = 0.0, 0  # dual_update: epoch accumulates the epoch's L_r
        self.steps_per_epoch = 1
        self.ref: torch.nn.Module | None = None
        self._all_reduce_mean = lambda x: x
        # dual_update: microbatch: id(micro-batch) → (micro-batch, λ it was scored with) this step, so
        # that a closure evaluated twice sees the same λ per micro-batch and moves λ only once.
        self._seen: dict[int, tuple[Batch, float]] = {}

    def setup(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        self.steps_per_epoch = ctx.steps_per_epoch
        self._all_reduce_mean = ctx.all_reduce_mean
        if self.args.retain_loss == "kl":
            self.ref = frozen_copy(model)
        if self.eps is None:  # auto, and not restored by load_state_dict
            self.eps = (1.0 + self.args.retain_eps_tol) * starting_retain_nll(model, ctx)

    def _warm(self) -> bool:
        """True while λ is held: the first ``dual_warmup_epochs`` epochs (step / microbatch modes)."""
        return self.step < math.ceil(self.args.dual_warmup_epochs * self.steps_per_epoch - 1e-9)

    def _dual_step(self, retain: float) -> None:
        """λ ← max(0, λ + η_λ·(L_r − ε)) with L_r already all-reduced."""
        assert self.eps is not None, "setup() sets ε"
        self.lam = max(0.0, self.lam + self.args.dual_lr * (retain - self.eps))
        self.dual_updates += 1

    def _retain(self, model: torch.nn.Module, r: Mapping[str, Any]) -> Tensor:
        logits = forward_logits(model, r)
        if self.args.retain_loss == "kl":
            assert self.ref is not None, "setup() builds the reference model"
            with torch.no_grad():
                ref_logits = forward_logits(self.ref, r)
            return kl_retain_loss(logits, ref_logits, r["labels"], token_weight=r["token_weight"])
        return nll_loss(logits, r["labels"], token_weight=r["token_weight"])

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        assert self.eps is not None, "setup() sets ε"
        f, r = batch["forget"], batch["retain"]
        f_logits = forward_logits(model, f)
        # The loop's accumulation weight that matches the reduction (losses module docstring).
        weight = f["seq_weight"] if self.args.reduction == "per_sequence" else f["token_weight"]
        forget = flatten_loss(
            f_logits,
            f["labels"],
            mask_alignment=self.args.mask_alignment,
            reduction=self.args.reduction,
            attention_mask=f["attention_mask"],
            weight=weight,
        )
        retain = self._retain(model, r)
        lam = self.lam
        if self.args.dual_update == "microbatch":
            seen = self._seen.get(id(batch))
            if seen is not None and seen[0] is batch:  # a re-evaluated closure: same λ, no update
                lam = seen[1]
            else:
                self._seen[id(batch)] = (batch, lam)
                if not self._warm():  # as the reference: this micro-batch's own L_r, later ones see the new λ
                    self._dual_step(self._all_reduce_mean(retain.item() / r["token_weight"]))
        # ε enters every micro-batch with weight 1: the loop's mean over micro-batches of
        # λ·(w_m·L_r,m − ε) is λ·(L_r − ε) for the step's token-mean L_r, since the w_m average to 1.
        total = self.args.gamma * forget + lam * (retain - self.eps)
        # Weighted values, so the loop's mean over micro-batches is the step's exact mean.
        stats = {
            "forget_loss": forget.item(),
            "retain_loss": retain.item(),
            "forget_nll": nll_loss(f_logits.detach(), f["labels"], token_weight=f["token_weight"]).item(),
        }
        return total, stats

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        assert self.eps is not None, "setup() sets ε"
        # Every process calls this collective every step, whatever the mode, so they stay in lockstep.
        retain = self._all_reduce_mean(stats["retain_loss"])
        mode = self.args.dual_update
        if mode == "step" and not self._warm():
            self._dual_step(retain)
        self.step += 1
        if mode == "epoch":
            self.epoch_sum, self.epoch_steps = self.epoch_sum + retain, self.epoch_steps + 1
            if self.step % self.steps_per_epoch == 0:
                # At the boundary that ends warm-up the first update runs, as the reference's
                # on_epoch_end callback does (it enables updates, then updates).
                if self.step // self.steps_per_epoch >= self.args.dual_warmup_epochs:
                    self._dual_step(self.epoch_sum / self.epoch_steps)
                self.epoch_sum, self.epoch_steps = 0.0, 0
        self._seen.clear()
        return {
            "lambda": self.lam,  # after this step's dual update: the λ of the next primal step
            "forget_loss": stats["forget_loss"],
            "retain_loss": retain,
            "constraint": retain - self.eps,
            "retain_eps": self.eps,
            "forget_nll": stats["forget_nll"],
            "dual_updates": float(self.dual_updates),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "retain_eps": self.eps,
            "step": self.step,
            "dual_updates": self.dual_updates,
            "epoch_retain_sum": self.epoch_sum,
            "epoch_steps": self.epoch_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore λ, ε (``setup`` then keeps it) and the step / epoch counters."""
        self.lam = float(state["lambda"])
        self.eps = None if state["retain_eps"] is None else float(state["retain_eps"])
        self.step, self.dual_updates = int(state["step"]), int(state["dual_updates"])
        self.epoch_sum, self.epoch_steps = float(state["epoch_retain_sum"]), int(state["epoch_steps"])
