"""Pure loss functions: tensors in, scalar tensor out (ALGORITHMS.md §1).

Conventions shared by every function here:

* ``logits`` are (B, T, V) and ``labels`` (B, T) as produced by ``data.tokenize.collate``: labels
  are ``IGNORE_INDEX`` (-100) on BOS, prompt and padding positions.
* The mask is *shifted*: ``logits[:, t]`` predicts ``labels[:, t + 1]``, so the loss falls on the
  logits that predict answer tokens.
* ``token_weight`` lets the training loop turn per-micro-batch token means into the token mean of
  the whole accumulated batch (torchtune's scheme): the loop passes
  ``weight = tokens_in_micro_batch / (tokens_in_step / n_micro_batches)`` and averages over
  micro-batches, so Σ_m w_m·mean_m / M = Σ_m sum_m / N.
* An all-masked batch gives 0, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unlearnflow.data.tokenize import IGNORE_INDEX


def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align logits with the tokens they predict.

    Returns:
        ``(logits[:, :-1], labels[:, 1:], mask)`` where mask (B, T-1) is True on answer tokens.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != IGNORE_INDEX


def answer_positions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The logits that predict answer tokens, flattened, with their targets and row indices.

    The single place where the shifted answer mask is applied (losses and every token-level
    metric go through it).

    Args:
        logits: (B, T, V), any float dtype.
        labels: (B, T), ``IGNORE_INDEX`` outside the answer.

    Returns:
        ``(kept, target, rows)``: (K, V) logits in their own dtype, (K,) token ids and (K,) row
        indices, K the number of answer tokens in the batch, in row-major order.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX  # (B, T-1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(target)[keep]
    return logits[:, :-1][keep], target[keep], rows


def sequence_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence summed answer-token cross-entropy (seqNLL) and answer-token counts.

    The one implementation, shared by the losses and the metrics. Only the kept positions are
    upcast to float32, so a bf16 model does not pay for a float32 copy of the whole (B, T, V) tensor.

    Args:
        logits: (B, T, V), any float dtype.
        labels: (B, T), ``IGNORE_INDEX`` outside the answer.

    Returns:
        ``(seq_nll, n_tokens)``, both (B,) float32; a row with no answer token has 0 and 0.
    """
    kept, target, rows = answer_positions(logits, labels)
    token_nll = F.cross_entropy(kept.float(), target, reduction="none")
    seq = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(
        0, rows, token_nll
    )
    return seq, torch.bincount(rows, minlength=labels.shape[0]).float()


def nll_loss(logits: Tensor, labels: Tensor, *, token_weight: float = 1.0) -> Tensor:
    """NLL(θ; B): mean next-token cross-entropy over the batch's answer tokens (ALGORITHMS.md notation).

    Args:
        logits: (B, T, V).
        labels: (B, T).
        token_weight: the loop's accumulation weight (see the module docstring).

    Returns:
        Scalar tensor; 0 when no token is labelled.
    """
    seq, n = sequence_nll(logits, labels)
    return token_weight * seq.sum() / n.sum().clamp_min(1.0)


def grad_ascent_loss(logits: Tensor, labels: Tensor, *, token_weight: float = 1.0) -> Tensor:
    """Gradient ascent forget loss: −NLL(θ; B_f) (ALGORITHMS.md §1 "grad_ascent").

    Unbounded below: minimising it drives the forget likelihood to zero and, left alone, the model
    to garbage, which is why the training loop has a divergence guard.
    Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models",
    arXiv:2210.01504, Eq. 1 (maximise the negative log-likelihood of the target sequence).
    """
    return -nll_loss(logits, labels, token_weight=token_weight)


def kl_retain_loss(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, *, token_weight: float = 1.0
) -> Tensor:
    """KL(π_ref ‖ π_θ) averaged over the answer positions of a retain batch (ALGORITHMS.md §1, retain side).

    Unlike open-unlearning's ``compute_kl_divergence``, which averages over every position (prompt
    and padding included), only the positions that predict answer tokens count.

    Args:
        logits: (B, T, V) of the model being unlearned.
        ref_logits: (B, T, V) of the frozen reference (no grad).
        labels: (B, T), used only for its mask.

    Returns:
        Scalar tensor, ≥ 0; 0 when no token is labelled.
    """
    logits, _, mask = shift(logits, labels)
    ref_logits = ref_logits[:, :-1]
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return token_weight * (kl * mask).sum() / mask.sum().clamp_min(1)
