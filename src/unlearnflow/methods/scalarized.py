"""Scalarized forget/retain objectives: L = γ·L_f + α·L_r (ALGORITHMS.md §2 "scalarized").

One class, ``Scalarized``, runs every method of the family; a method is its forget loss (an entry
of ``FORGET_LOSSES``) and its hyperparameters (``Args``, defaults from open-unlearning's
``configs/trainer/<Method>.yaml``). L_r is ``nll`` (NLL on the retain batch) or ``kl``
(KL(π_ref ‖ π_θ) on its answer positions); α = 0 drops the retain stream.

* grad_ascent: Jang et al. 2023, arXiv:2210.01504 (γ = 1, α = 0).
* grad_diff: Liu et al. 2022, arXiv:2203.12817; the TOFU baseline, Maini et al. 2024, arXiv:2401.06121.
* npo: Zhang et al. 2024, arXiv:2404.05868.   * simnpo: Fan et al. 2024, arXiv:2410.07163.
* idk_dpo / idk_nll: TOFU's "I don't know" targets (arXiv:2401.06121), DPO (arXiv:2305.18290).
* undial: Dong et al. 2024, arXiv:2402.10052.   * ceu: Yang et al. 2025, arXiv:2503.01224.
* wga: Wang et al. 2025, arXiv:2502.19301.   * satimp: Yang et al. 2025, arXiv:2505.11953.

The maths and the deviations from open-unlearning live in the losses (``unlearnflow.losses``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.losses import (
    ceu_loss,
    grad_ascent_loss,
    idk_dpo_loss,
    idk_nll_loss,
    kl_retain_loss,
    nll_loss,
    npo_loss,
    satimp_loss,
    simnpo_loss,
    undial_loss,
    wga_loss,
)
from unlearnflow.methods.base import (
    METHODS,
    Batch,
    MethodArgs,
    TrainContext,
    forward_logits,
    frozen_copy,
)


@dataclass(frozen=True)
class ForgetInputs:
    """What a forget loss reads, per stream: the model's logits (with gradient), π_ref's logits
    (empty unless the loss needs the reference) and the labels."""

    logits: Mapping[str, Tensor]
    ref: Mapping[str, Tensor]
    labels: Mapping[str, Tensor]


@dataclass(frozen=True)
class ForgetLoss:
    """How one loss of ``unlearnflow.losses`` plugs in as L_f.

    Attributes:
        compute: ``compute(inputs, **hyperparameters, <weight>=w)`` → scalar; adapts the loss's
            own signature.
        weight: the loop's accumulation weight the loss takes: ``token_weight`` (token means) or
            ``seq_weight`` (sequence means), read from the sub-batch of ``streams[0]``.
        streams: the streams whose logits the loss differentiates ("idk": the forget questions
            with refusal answers, built by ``data.refusals``).
        needs_ref: π_ref's logits on ``streams`` (a frozen copy of the starting model).
        hparams: the ``Args`` fields passed to the loss as keywords.
    """

    compute: Callable[..., Tensor]
    weight: Literal["token_weight", "seq_weight"] = "token_weight"
    streams: tuple[str, ...] = ("forget",)
    needs_ref: bool = False
    hparams: tuple[str, ...] = ()


def _on_forget(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Adapter for the losses of the forget batch alone: ``loss(logits, labels, **kw)``."""
    return lambda x, **kw: loss(x.logits["forget"], x.labels["forget"], **kw)


FORGET_LOSSES: dict[str, ForgetLoss] = {
    "grad_ascent": ForgetLoss(_on_forget(grad_ascent_loss)),
    "npo": ForgetLoss(
        lambda x, **kw: npo_loss(x.logits["forget"], x.labels["forget"], x.ref["forget"], **kw),
        weight="seq_weight",
        needs_ref=True,
        hparams=("beta",),
    ),
    "simnpo": ForgetLoss(_on_forget(simnpo_loss), weight="seq_weight", hparams=("beta", "delta")),
    "idk_dpo": ForgetLoss(
        lambda x, **kw: idk_dpo_loss(
            x.logits["idk"],
            x.labels["idk"],
            x.ref["idk"],
            x.logits["forget"],
            x.labels["forget"],
            x.ref["forget"],
            **kw,
        ),
        weight="seq_weight",  # the forget stream's: row i of "idk" pairs with row i of "forget"
        streams=("forget", "idk"),
        needs_ref=True,
        hparams=("beta",),
    ),
    "idk_nll": ForgetLoss(
        lambda x, **kw: idk_nll_loss(x.logits["idk"], x.labels["idk"], **kw), streams=("idk",)
    ),
    "undial": ForgetLoss(
        lambda x, **kw: undial_loss(x.logits["forget"], x.ref["forget"], x.labels["forget"], **kw),
        needs_ref=True,
        hparams=("beta",),
    ),
    "ceu": ForgetLoss(_on_forget(ceu_loss), hparams=("ignore_first_n_answer_tokens",)),
    "wga": ForgetLoss(_on_forget(wga_loss), hparams=("beta",)),
    "satimp": ForgetLoss(_on_forget(satimp_loss), hparams=("beta1", "beta2")),
}
RETAIN_LOSSES = ("nll", "kl")

_GAMMA = "weight γ of the forget loss"
_ALPHA = "weight α of the retain loss (0: no retain stream)"
_RETAIN = "L_r: NLL on the retain batch, or KL(π_ref ‖ π_θ) to the starting model on it"


class GradAscentArgs(MethodArgs):
    gamma: float = Field(1.0, gt=0, description=_GAMMA)


class GradDiffArgs(MethodArgs):
    gamma: float = Field(1.0, gt=0, description=_GAMMA)
    alpha: float = Field(1.0, ge=0, description=_ALPHA)
    retain_loss: Literal["nll", "kl"] = Field("nll", description=_RETAIN)


class NPOArgs(GradDiffArgs):
    """open-unlearning configs/trainer/NPO.yaml."""

    beta: float = Field(0.1, gt=0, description="inverse temperature β of the NPO loss")


class SimNPOArgs(GradDiffArgs):
    """open-unlearning configs/trainer/SimNPO.yaml (γ = npo_coeff 0.125 of the authors' TOFU config)."""

    gamma: float = Field(0.125, gt=0, description=_GAMMA)
    beta: float = Field(4.5, gt=0, description="inverse temperature β")
    delta: float = Field(0.0, description="margin δ on the length-normalised NLL scale (the paper's γ/β)")


class IdkDPOArgs(GradDiffArgs):
    """open-unlearning configs/trainer/DPO.yaml (the TOFU IdkDPO recipe)."""

    beta: float = Field(0.1, gt=0, description="inverse temperature β of the DPO loss")


class IdkNLLArgs(GradDiffArgs):
    """TOFU's IdkNLL (γ = α = 1 as GradDiff): NLL of refusal answers to the forget questions."""


class UndialArgs(GradDiffArgs):
    """open-unlearning configs/trainer/UNDIAL.yaml: no retain term by default (α = 0)."""

    alpha: float = Field(0.0, ge=0, description=_ALPHA)
    beta: float = Field(10.0, gt=0, description="logit penalty β on the true token in the target")


class CEUArgs(GradDiffArgs):
    """open-unlearning configs/trainer/CEU.yaml: the CE-U loss alone (α = 0 reproduces it)."""

    alpha: float = Field(0.0, ge=0, description=_ALPHA)
    ignore_first_n_answer_tokens: int = Field(
        1, ge=0, description="answer tokens not scored at the start of each answer (the paper's footnote)"
    )


class WGAArgs(GradDiffArgs):
    """open-unlearning configs/trainer/WGA.yaml."""

    beta: float = Field(1.0, gt=0, description="exponent β of the detached token-probability weight")


class SatImpArgs(GradDiffArgs):
    """open-unlearning configs/trainer/SatImp.yaml."""

    gamma: float = Field(0.1, gt=0, description=_GAMMA)
    beta1: float = Field(5.0, gt=0, description="saturation exponent β1 (weight p^β1)")
    beta2: float = Field(1.0, gt=0, description="importance exponent β2 (weight (1 − p)^β2)")


def _per_unit(value: Tensor, weight: float) -> float:
    # The logged value without the loop's accumulation weight (0 for a micro-batch without answers).
    return value.item() / weight if weight else 0.0


class Scalarized:
    """γ·L_f(forget side) + α·L_r(retain batch); the retain stream is skipped when α = 0.

    Streams: "forget" first (it sets the epoch), then the loss's other streams, then "retain".
    "idk" is drawn in lockstep with "forget" (``paired_streams``), so row i of both sub-batches
    is the same question. π_ref is built only when the forget loss or a KL retain loss needs it.
    """

    Args: ClassVar[type[Section]] = GradDiffArgs
    needs_grad = False
    forget_loss = "grad_ascent"

    def __init__(self, args: Section) -> None:
        self.args = args
        self.spec = FORGET_LOSSES[self.forget_loss]
        self.gamma: float = args.gamma
        self.alpha: float = getattr(args, "alpha", 0.0)
        self.retain_loss: str = getattr(args, "retain_loss", "nll")
        self.hparams = {k: getattr(args, k) for k in self.spec.hparams}
        forget_side = ("forget", *(s for s in self.spec.streams if s != "forget"))
        self.streams: tuple[str, ...] = forget_side + (("retain",) if self.alpha > 0 else ())
        self.paired_streams: dict[str, str] = {"idk": "forget"} if "idk" in self.streams else {}
        self.needs_ref = self.spec.needs_ref or (self.alpha > 0 and self.retain_loss == "kl")
        self.ref: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        if self.needs_ref:
            self.ref = frozen_copy(model)

    def _ref_logits(self, sub: Mapping[str, Any]) -> Tensor:
        assert self.ref is not None, "setup() builds the reference model"
        with torch.no_grad():
            return forward_logits(self.ref, sub)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        spec = self.spec
        logits = {s: forward_logits(model, batch[s]) for s in spec.streams}
        ref = {s: self._ref_logits(batch[s]) for s in spec.streams} if spec.needs_ref else {}
        labels = {s: batch[s]["labels"] for s in spec.streams}
        weight = batch[spec.streams[0]][spec.weight]
        forget = spec.compute(ForgetInputs(logits, ref, labels), **self.hparams, **{spec.weight: weight})
        if "forget" in logits:
            f_logits = logits["forget"].detach()
        else:  # idk_nll trains on refusals only: one gradient-free forward for the health statistic
            with torch.no_grad():
                f_logits = forward_logits(model, batch["forget"])
        stats = {
            "forget_loss": _per_unit(forget, weight),
            "forget_nll": nll_loss(f_logits, batch["forget"]["labels"]).item(),  # the health checks read it
        }
        total = self.gamma * forget
        if self.alpha > 0:
            r = batch["retain"]
            r_logits = forward_logits(model, r)
            if self.retain_loss == "kl":
                retain = kl_retain_loss(
                    r_logits, self._ref_logits(r), r["labels"], token_weight=r["token_weight"]
                )
            else:
                retain = nll_loss(r_logits, r["labels"], token_weight=r["token_weight"])
            stats["retain_loss"] = _per_unit(retain, r["token_weight"])
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


@METHODS.register("npo")
class NPO(Scalarized):
    """NPO: γ·(2/β)·mean softplus(β·log π_θ(y|x)/π_ref(y|x)) on B_f + α·L_r."""

    Args: ClassVar[type[Section]] = NPOArgs
    forget_loss = "npo"


@METHODS.register("simnpo")
class SimNPO(Scalarized):
    """SimNPO: γ·(−(2/β)·mean log σ(β·(avgNLL − δ))) on B_f + α·L_r; reference-free."""

    Args: ClassVar[type[Section]] = SimNPOArgs
    forget_loss = "simnpo"


@METHODS.register("idk_dpo")
class IdkDPO(Scalarized):
    """IdkDPO: DPO preferring a refusal over the forget answer to the same question, + α·L_r."""

    Args: ClassVar[type[Section]] = IdkDPOArgs
    forget_loss = "idk_dpo"


@METHODS.register("idk_nll")
class IdkNLL(Scalarized):
    """IdkNLL: γ·NLL(θ; forget question, refusal) + α·L_r."""

    Args: ClassVar[type[Section]] = IdkNLLArgs
    forget_loss = "idk_nll"


@METHODS.register("undial")
class Undial(Scalarized):
    """UNDIAL: self-distillation to π_ref's logits with the true token's lowered by β, + α·L_r."""

    Args: ClassVar[type[Section]] = UndialArgs
    forget_loss = "undial"


@METHODS.register("ceu")
class CEU(Scalarized):
    """CE-U: cross-entropy to the model's own distribution with the true token removed, + α·L_r."""

    Args: ClassVar[type[Section]] = CEUArgs
    forget_loss = "ceu"


@METHODS.register("wga")
class WGA(Scalarized):
    """WGA: gradient ascent weighted by the detached token probability p^β, + α·L_r."""

    Args: ClassVar[type[Section]] = WGAArgs
    forget_loss = "wga"


@METHODS.register("satimp")
class SatImp(Scalarized):
    """SatImp: gradient ascent weighted by p^β1·(1 − p)^β2 (detached), + α·L_r."""

    Args: ClassVar[type[Section]] = SatImpArgs
    forget_loss = "satimp"
