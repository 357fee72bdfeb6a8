"""How far unlearning moved the weights, measured against the step of a 4-bit quantization grid.

Why: a quantization attack restores forgotten knowledge when unlearning moves the weights by less
than one quantization step, so that the unlearned and the target weights round to the same codes
(Zhang et al., ICLR 2025, "Catastrophic Failure of LLM Unlearning via Quantization", §4). Every
unlearned model reports these numbers beside its results, so that a reader sees in which regime an
attack was (or was not) able to bite. The matrices measured are those the ``quantize`` attack
quantizes (``quantizable_linears``: every Linear but the LM head), on the grid of its ``rtn``
backend (``rtn_quantize``); both live here so that the unlearn stage needs no attack code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from unlearnflow.errors import UnlearnflowError

Q4_BITS, Q4_GROUP = 4, 128  # the grid of the reference: round-to-nearest 4-bit, groups of 128


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` but the LM head and Linears whose weight is an embedding's (tied).

    A weight shared by several Linears is listed once (the first name in module order).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: list[tuple[str, nn.Linear]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        key = id(module.weight)
        if key in embedding_weights or key in seen:
            continue
        seen.add(key)
        found.append((name, module))
    return found


@torch.no_grad()
def rtn_quantize(w: Tensor, *, bits: int, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest: ŵ = s·clamp(round(w/s), −q_max, q_max), s = max|w_group| / q_max.

    q_max = 2^(bits−1) − 1, one scale per output row and group of ``group_size`` consecutive input
    weights. A width that ``group_size`` does not divide ends in a shorter last group; a group of
    zeros gets s = 0 and stays 0 (no NaN). Rounding is torch's (half to even).

    Args:
        w: (out, in) weight, any float dtype; computed in float32.
        bits: 2..8.
        group_size: input weights per scale; None = the whole row.

    Returns:
        (ŵ, s): ŵ (out, in) float32 on the grid; s (out, ceil(in / group_size)) float32.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"rtn_quantize: bits must be in 2..8, got {bits}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"rtn_quantize: group_size must be ≥ 1 or None, got {group_size}")
    qmax = 2 ** (bits - 1) - 1
    rows, width = w.shape
    g = width if group_size is None else min(group_size, width)
    n_groups = -(-width // g)
    # Zero padding to a whole number of groups changes no group's max|w| and is cut off below.
    padded = torch.zeros(rows, n_groups * g, dtype=torch.float32, device=w.device)
    padded[:, :width] = w.float()
    groups = padded.view(rows, n_groups, g)
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero group divides by 1
    q = torch.clamp(torch.round(groups / safe), -qmax, qmax)
    w_hat = (q * scale).view(rows, n_groups * g)[:, :width]
    return w_hat.contiguous(), scale.squeeze(-1)


def _reference_tensors(folder: Path, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of ``names`` from a safetensors checkpoint, one tensor in memory at a time."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        by_file: dict[str, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name in names:
                by_file.setdefault(file, []).append(name)
    elif (folder / "model.safetensors").is_file():
        by_file = {"model.safetensors": sorted(names)}
    else:
        raise UnlearnflowError(f"no safetensors weights in {folder} to measure the weight change against")
    for file, keys in by_file.items():
        with safe_open(str(folder / file), framework="pt") as f:
            present = set(f.keys())
            for key in keys:
                if key in present:
                    yield key, f.get_tensor(key)


def _grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's 4-bit RTN code (group 128) and its step (the group's scale; 0: all-zero group)."""
    w_hat, scale = rtn_quantize(w, bits=Q4_BITS, group_size=Q4_GROUP)
    step = scale.repeat_interleave(min(Q4_GROUP, w.shape[1]), dim=1)[:, : w.shape[1]]
    codes = torch.where(step > 0, torch.round(w_hat / step.clamp_min(1e-30)), torch.zeros_like(w_hat))
    return codes, step


@torch.no_grad()
def weight_change(model: nn.Module, reference: Path) -> dict[str, float]:
    """How far ``model``'s quantizable matrices are from the checkpoint in ``reference``.

    Returns:
        ``rel_change``: ‖θ − θ_ref‖ / ‖θ_ref‖ over all those matrices together;
        ``rel_change_max``: the largest per-matrix ‖ΔW‖/‖W_ref‖;
        ``q4_step_ratio``: mean |Δw| in units of its 4-bit step (the reference's RTN scale, group 128):
        far below 0.5, most weights round back to the reference's grid point;
        ``q4_code_change``: the fraction of weights whose 4-bit RTN code differs from the reference's
        (computed with each model's own scales): what a 4-bit quantization keeps of the unlearning.
    """
    params = {f"{name}.weight": m.weight for name, m in quantizable_linears(model)}
    delta_sq = ref_sq = step_sum = 0.0
    changed = total = stepped = 0
    worst = 0.0
    for name, ref in _reference_tensors(Path(reference), set(params)):
        w = params[name].detach().float().cpu()
        ref = ref.float()
        if ref.shape != w.shape:
            raise UnlearnflowError(
                f"{reference}: {name} has shape {tuple(ref.shape)}, the model {tuple(w.shape)}"
            )
        d = w - ref
        dn, rn = float(d.square().sum()), float(ref.square().sum())
        delta_sq, ref_sq = delta_sq + dn, ref_sq + rn
        worst = max(worst, math.sqrt(dn / rn) if rn > 0 else 0.0)
        ref_codes, ref_scale = _grid(ref)
        on_grid = ref_scale > 0  # an all-zero group has no step to measure in
        step_sum += float((d.abs()[on_grid] / ref_scale[on_grid]).sum())
        stepped += int(on_grid.sum())
        changed += int((_grid(w)[0] != ref_codes).sum())
        total += w.numel()
    if total == 0:
        raise UnlearnflowError(f"{reference}: none of the model's quantizable matrices is in the checkpoint")
    return {
        "rel_change": math.sqrt(delta_sq / ref_sq) if ref_sq > 0 else 0.0,
        "rel_change_max": worst,
        "q4_step_ratio": step_sum / max(1, stepped),
        "q4_code_change": changed / total,
    }
