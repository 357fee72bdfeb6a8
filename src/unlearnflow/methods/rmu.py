"""RMU, Representation Misdirection for Unlearning (ALGORITHMS.md §1 "rmu").

Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning",
arXiv:2403.03218, §5 and Algorithm 1: steer the layer-ℓ hidden states of forget tokens toward a
fixed random direction scaled by c, keep those of retain tokens where the frozen model has them,
and train only a few parameters below ℓ:

    L = γ·mean_t ‖h_ℓ(θ; x_f)_t − c·u‖² + α·mean_t ‖h_ℓ(θ; x_r)_t − h_ℓ(ref; x_r)_t‖²

(``losses.rmu_forget_loss`` / ``rmu_retain_loss``; means over answer tokens, unshifted mask).
Open-unlearning's port is src/trainer/unlearn/rmu.py + configs/trainer/RMU.yaml.

Choices, and where they differ from the references:
* h_ℓ is the output of decoder layer ``layer`` (0-based), read by a forward hook, as in the WMDP
  code. Not ``hidden_states[layer + 1]``: for the last layer HF models return the *final-normed*
  state there, not the layer's output.
* u ~ U[0, 1)^D normalised to unit length (WMDP and open-unlearning draw ``torch.rand`` then
  normalise, so u is a non-negative direction, not uniform on the sphere), drawn once in ``setup``
  from a generator seeded by ``control_seed``: runs with one seed steer to the same vector.
* Trained parameters: ``train_params`` (regex, full match on the name inside a layer) within
  ``train_layers``; default the WMDP choice, ``mlp.down_proj.weight`` of layers ℓ−2, ℓ−1, ℓ.
  Open-unlearning's RMU.yaml trains everything (``train_params: ".*"`` with every layer ≤ ℓ here:
  parameters above ℓ cannot change h_ℓ, so they are refused rather than silently left still).
* Masks (``positions``): answer tokens of both batches by default (open-unlearning); "all" takes
  every non-padding position, prompt included, like the WMDP code on its plain-text corpora. With
  "answer" the question's tokens keep their states, and later layers can still read the fact
  from them through attention. Reductions as in ``losses.rmu_forget_loss``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from unlearnflow.config import Section
from unlearnflow.errors import ConfigError
from unlearnflow.losses import answer_mask, nll_loss, rmu_forget_loss, rmu_retain_loss
from unlearnflow.methods.base import METHODS, Batch, MethodArgs, TrainContext, frozen_copy

log = logging.getLogger(__name__)

# Where HF causal LMs keep their decoder layers: Llama/Mistral/Qwen/Gemma/Phi-3 (model.layers),
# GPT-2/GPT-J/Falcon/Bloom (transformer.h), GPT-NeoX/Pythia (gpt_neox.layers).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers")


class RMUArgs(MethodArgs):
    layer: int = Field(
        1, ge=0, description="ℓ: decoder layer (0-based) whose output is steered (WMDP: 7 of 32)"
    )
    steering_coeff: float = Field(
        20.0, gt=0, description="c: norm of the control vector c·u; scale with ‖h_ℓ‖ (WMDP: 6.5 Zephyr)"
    )
    alpha: float = Field(100.0, ge=0, description="weight of the retain loss (WMDP code: 100)")
    gamma: float = Field(1.0, gt=0, description="weight of the forget loss")
    train_layers: list[int] | None = Field(
        None, description="layers whose parameters train; null: [ℓ−2, ℓ−1, ℓ] clipped at 0 (WMDP)"
    )
    train_params: str = Field(
        r"mlp\.down_proj\.weight",
        description="regex, full match on parameter names inside a layer; '.*' trains whole layers",
    )
    control_seed: int = Field(0, ge=0, description="seed of the random direction u")
    hidden_reduction: Literal["mean", "sum"] = Field(
        "mean", description="per token: mean over D of (h − target)² (WMDP MSE) or the sum (‖·‖²)"
    )
    positions: Literal["answer", "all"] = Field(
        "answer", description="tokens whose states count: answer (open-unlearning) or all non-pad (WMDP)"
    )

    @model_validator(mode="after")
    def _layers_below_l(self) -> RMUArgs:
        layers = self.train_layers
        if layers is not None and (not layers or any(not 0 <= i <= self.layer for i in layers)):
            raise ValueError(
                f"rmu.train_layers={layers} must be a non-empty list of layers in [0, layer={self.layer}]: "
                "a layer above ℓ cannot move h_ℓ"
            )
        try:
            re.compile(self.train_params)
        except re.error as exc:
            raise ValueError(f"rmu.train_params={self.train_params!r} is not a regex: {exc}") from None
        return self

    def trained_layers(self) -> list[int]:
        if self.train_layers is not None:
            return sorted(set(self.train_layers))
        return sorted({max(0, self.layer - k) for k in (2, 1, 0)})


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM (``LAYER_PATHS``); ConfigError for other architectures."""
    for path in LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise ConfigError(
        f"rmu: cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(LAYER_PATHS)})"
    )


class _Stop(Exception):
    """Raised by the hook to end a forward pass once layer ℓ has run (reference model only)."""


def layer_output(
    model: torch.nn.Module, layer: torch.nn.Module, sub: Mapping[str, Any], *, stop: bool = False
) -> tuple[Tensor, Any]:
    """Run ``model`` on ``sub``; return the output of ``layer`` (B, T, D) and the model's output.

    ``stop=True`` skips the layers above and the LM head (the output is then None). Only for a
    plain, unwrapped module: under DDP an aborted forward skips the reducer's bookkeeping.
    """
    captured: list[Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _Stop

    handle = layer.register_forward_hook(hook)
    out = None
    try:
        out = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"])
    except _Stop:
        pass
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"rmu: layer hook fired {len(captured)} times; loss() must get the model setup() saw"
        )
    return captured[0], out


def _mask(sub: Mapping[str, Any], positions: str) -> Tensor:
    return answer_mask(sub["labels"]) if positions == "answer" else sub["attention_mask"].bool()


def _per_token(value: Tensor, weight: float) -> float:
    # The losses carry the loop's accumulation weight; the logged value is the plain token mean.
    return value.item() / weight if weight else 0.0


@METHODS.register("rmu")
class RMU:
    """γ·‖h_ℓ(θ; B_f) − c·u‖² + α·‖h_ℓ(θ; B_r) − h_ℓ(ref; B_r)‖², training chosen parameters only."""

    Args: ClassVar[type[Section]] = RMUArgs
    streams = ("forget", "retain")
    needs_grad = False

    def __init__(self, args: RMUArgs) -> None:
        self.args = args
        self.ref: torch.nn.Module | None = None
        self.control: Tensor | None = None
        self.trainable_params = 0
        self._layer: torch.nn.Module | None = None
        self._ref_layer: torch.nn.Module | None = None
        self._logged = False

    def setup(self, model: torch.nn.Module, ctx: TrainContext) -> None:
        a = self.args
        layers = decoder_layers(model)
        if a.layer >= len(layers):
            raise ConfigError(
                f"rmu.layer={a.layer} is out of range: {type(model).__name__} has {len(layers)} "
                f"decoder layers (0..{len(layers) - 1})"
            )
        self.ref = frozen_copy(model)
        self._layer, self._ref_layer = layers[a.layer], decoder_layers(self.ref)[a.layer]

        # Freeze everything, then unfreeze the chosen parameters: the optimizer is built after
        # setup from the parameters that require grad, so it never sees the others.
        for p in model.parameters():
            p.requires_grad_(False)
        pattern, names = re.compile(a.train_params), []
        for i in a.trained_layers():
            for name, p in layers[i].named_parameters():
                if pattern.fullmatch(name):
                    p.requires_grad_(True)
                    names.append(f"{i}.{name}")
        if not names:
            inside = ", ".join(n for n, _ in layers[0].named_parameters())
            raise ConfigError(
                f"rmu.train_params={a.train_params!r} matches no parameter of layers "
                f"{a.trained_layers()} (names inside a layer: {inside})"
            )
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._logged = False
        log.info("rmu: training %d parameters (%s)", self.trainable_params, ", ".join(names))

        # u ~ U[0,1)^D normalised, as WMDP's unlearn.py draws it; a private generator so that the
        # direction depends on control_seed alone, not on the global RNG state.
        u = torch.rand(
            int(model.config.hidden_size),
            generator=torch.Generator().manual_seed(a.control_seed),
            dtype=torch.float64,
        )
        self.control = (a.steering_coeff * u / u.norm()).float().to(ctx.device)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        assert self.ref is not None and self.control is not None, "setup() runs first"
        assert self._layer is not None and self._ref_layer is not None
        a, f, r = self.args, batch["forget"], batch["retain"]

        # The forget pass runs the whole model: its logits give forget_nll for the health checks.
        h_f, out_f = layer_output(model, self._layer, f)
        forget = rmu_forget_loss(
            h_f,
            _mask(f, a.positions),
            self.control,
            token_weight=f["token_weight"],
            hidden_reduction=a.hidden_reduction,
        )
        h_r, _ = layer_output(model, self._layer, r)  # whole model: an aborted forward breaks DDP
        with torch.no_grad():
            h_ref, _ = layer_output(self.ref, self._ref_layer, r, stop=True)
        retain = rmu_retain_loss(
            h_r,
            h_ref,
            _mask(r, a.positions),
            token_weight=r["token_weight"],
            hidden_reduction=a.hidden_reduction,
        )
        # Squared hidden-state distances, not per-token losses: named apart from forget_loss /
        # retain_loss so the loop's NLL-scale health checks (train.DESCENT_STATS) do not read them.
        stats = {
            "forget_distance": _per_token(forget, f["token_weight"]),
            "retain_distance": _per_token(retain, r["token_weight"]),
            "forget_nll": nll_loss(out_f.logits.detach(), f["labels"]).item(),
        }
        return a.gamma * forget + a.alpha * retain, stats

    def after_step(self, stats: Mapping[str, float]) -> dict[str, float]:
        if self._logged:
            return {}
        self._logged = True  # once, on the first step's row
        return {"trainable_params": float(self.trainable_params)}

    def state_dict(self) -> dict[str, Any]:
        return {}  # u is re-drawn from control_seed; nothing else changes during a run
