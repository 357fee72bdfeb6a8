"""Post-training weight quantization as an attack (ALGORITHMS.md §4 "quantize").

Zhang et al., "Catastrophic Failure of LLM Unlearning via Quantization" (ICLR 2025,
arXiv:2410.16454) load the unlearned model with bitsandbytes (``load_in_4bit``: blockwise FP4, the
library default, or NF4; ``load_in_8bit``: LLM.int8, Dettmers et al. 2022, arXiv:2208.07339) and
find forgotten knowledge coming back. ``bnb`` reproduces that weight quantization; ``rtn`` is a
transparent symmetric round-to-nearest baseline in plain torch.

Every ``nn.Linear`` but the LM head and any Linear tied to an embedding is quantized (as
transformers' bitsandbytes integration skips ``lm_head``); embeddings, norms and biases stay as
they are. The weights are written back *dequantized*, in the model's dtype: the attacked
checkpoint is an ordinary safetensors model whose Linear weights lie on the quantization grid, so
``evaluate`` loads it like any other. At 4 bits that is the quantized model's computation up to
float rounding (bnb dequantizes the weight, then runs a plain matmul); LLM.int8 at inference also
quantizes the activations, which a dequantized checkpoint does not reproduce.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unlearnflow.attacks import ATTACKS, AttackContext
from unlearnflow.config import QuantizeAttackConfig, Section
from unlearnflow.errors import UnlearnflowError
from unlearnflow.weights import quantizable_linears, rtn_quantize

log = logging.getLogger(__name__)


def _bnb_functional() -> Any:
    """``bitsandbytes.functional``, imported on use so the package is only needed for ``bnb``."""
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as err:
        raise UnlearnflowError(
            f"attack quantize: backend bnb needs bitsandbytes ({err}); pip install bitsandbytes, "
            "or use backend: rtn"
        ) from None
    return bnb_f


@torch.no_grad()
def bnb_quantize_4bit(w: Tensor, *, blocksize: int, quant_type: str) -> Tensor:
    """bitsandbytes blockwise 4-bit (``load_in_4bit``): ŵ = absmax_block · code[idx].

    ``quantize_4bit`` splits the *flattened* weight into blocks of ``blocksize`` (a block may span
    two rows when the width is not a multiple), scales each by its absmax and picks the nearest of
    the 16 FP4 or NF4 code values; ``dequantize_4bit`` is what ``Linear4bit`` runs before its
    matmul. No double quantization of the absmax (``compress_statistics=False``, as in
    transformers' ``bnb_4bit_use_double_quant`` default). fp32 input runs on CPU and CUDA.

    Args:
        w: (out, in) weight; computed in float32.
        blocksize: one bitsandbytes accepts (32 … 4096, powers of two: ``QuantizeAttackConfig``).
        quant_type: "fp4" or "nf4".

    Returns:
        ŵ (out, in) float32.
    """
    bnb_f = _bnb_functional()
    packed, state = bnb_f.quantize_4bit(
        w.float().contiguous(), blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    return bnb_f.dequantize_4bit(packed, state)


@torch.no_grad()
def bnb_quantize_8bit(w: Tensor) -> tuple[Tensor, Tensor]:
    """LLM.int8 weight quantization (``load_in_8bit``): row-wise absmax int8, ŵ = q·absmax_row/127.

    As bitsandbytes' ``Int8Params`` does, the weight is cast to float16 and passed to
    ``int8_vectorwise_quant`` (q = round(127·w/absmax_row); no outlier split for weights). The
    dequantization is done here in float64, so the row's absmax comes back exactly (127·a/127 = a);
    bnb's own ``q·(a·(1/127))`` in float32 may differ by one ulp. A zero row stays zero.

    Args:
        w: (out, in) weight.

    Returns:
        (ŵ, absmax): ŵ (out, in) float32; absmax (out,) float32 of the float16 weight.
    """
    bnb_f = _bnb_functional()
    w16 = w.to(torch.float16).contiguous()
    if not torch.isfinite(w16).all():
        raise UnlearnflowError(
            "attack quantize: bnb 8-bit casts weights to float16, and |w| > 65504 overflows"
        )
    q, absmax, _ = bnb_f.int8_vectorwise_quant(w16)
    # A zero row makes bnb divide 0 by 0 (q undefined); its absmax 0 zeroes ŵ whatever q is.
    w_hat = q.double() * absmax.double().unsqueeze(1) / 127.0
    return w_hat.float(), absmax


def dequantized_weight(w: Tensor, args: QuantizeAttackConfig) -> Tensor:
    """ŵ (float32, on w's device) for one weight under ``args`` (backend, bits, code book, block)."""
    if args.backend == "rtn":
        return rtn_quantize(w, bits=args.bits, group_size=args.group_size)[0]
    if args.bits == 4:
        return bnb_quantize_4bit(w, blocksize=args.blocksize, quant_type=args.quant_type)
    return bnb_quantize_8bit(w)[0]


@torch.no_grad()
def quantize_model(model: nn.Module, args: QuantizeAttackConfig) -> dict[str, float]:
    """Replace every quantizable Linear weight by its dequantized value, in place, in its own dtype.

    Returns:
        ``quantized_layers``; ``quant_rel_change`` = ‖Ŵ − W‖/‖W‖ over all quantized weights together
        (Ŵ as written, after the cast back to the model's dtype); ``quant_bits``.
    """
    diff_sq, norm_sq = 0.0, 0.0
    layers = quantizable_linears(model)
    for _, linear in layers:
        w = linear.weight
        original = w.detach().to(torch.float32, copy=True)  # .float() of fp32 would alias w
        w.copy_(dequantized_weight(original, args).to(w.dtype))
        diff_sq += float((w.float() - original).double().pow(2).sum())
        norm_sq += float(original.double().pow(2).sum())
    log.info("quantize %s %d-bit: %d Linear layers", args.backend, args.bits, len(layers))
    return {
        "quantized_layers": float(len(layers)),
        "quant_rel_change": (diff_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0,
        "quant_bits": float(args.bits),
    }


@ATTACKS.register("quantize")
class QuantizeAttack:
    """Quantize the weights and evaluate the dequantized model: does the forgetting survive?"""

    Args: ClassVar[type[Section]] = QuantizeAttackConfig
    modifies_weights: ClassVar[bool] = True

    def __init__(self, args: QuantizeAttackConfig) -> None:
        self.args = args  # blocksize, bits and code book are checked by the config (Literal values)

    def apply(self, model: nn.Module, ctx: AttackContext) -> dict[str, float]:
        return quantize_model(model, self.args)
