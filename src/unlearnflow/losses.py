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
* Losses that are a mean over *sequences* (npo, simnpo, idk_dpo, flatten per_sequence) take
  ``seq_weight`` instead, the same scheme one level up: the loop passes
  ``seq_weight = rows_in_micro_batch / (rows_in_step / n_micro_batches)``, the loss multiplies its
  sequence mean by it, and Σ_m w_m·mean_m / M is the sequence mean of the whole step. A row with no
  answer token (all labels -100, e.g. truncated away) is left out of a sequence mean: the mean is
  over rows with at least one answer token.
* An all-masked batch gives 0, not NaN, and a finite (zero) gradient.
* Reference-model inputs (``ref_logits``, ``ref_hidden``) are detached: the frozen reference never
  receives a gradient from these losses.
"""

from __future__ import annotations

from typing import Literal

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


# --- Forget losses of the method zoo (issue 9, ALGORITHMS.md §1) --------------------------------
#
# Equation numbers are given only where they could be checked offline; otherwise the objective is
# written out in full and the section of the paper named.


def answer_mask(labels: Tensor) -> Tensor:
    """(B, T) bool, True on the *unshifted* positions of the answer tokens (``labels != -100``).

    For quantities that belong to a token's own position rather than to the logits that predict
    it: RMU's hidden states and flatten's ``mask_alignment="unshifted"``.
    """
    return labels != IGNORE_INDEX


def _sequence_mean(per_row: Tensor, has_answer: Tensor) -> Tensor:
    """Mean of ``per_row`` (B,) over the rows where ``has_answer`` (B,) is True; 0 if none is.

    ``per_row`` must be finite everywhere: ``torch.where`` blocks the value of an excluded row but
    not a NaN in its gradient.
    """
    kept = torch.where(has_answer, per_row, torch.zeros_like(per_row))
    return kept.sum() / has_answer.sum().clamp_min(1)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def npo_loss(
    logits: Tensor, labels: Tensor, ref_logits: Tensor, *, beta: float = 0.1, seq_weight: float = 1.0
) -> Tensor:
    """NPO forget loss: (2/β)·mean_i softplus(β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))).

    Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective
    Unlearning", arXiv:2404.05868, §3: L_NPO,β = −(2/β)·E log σ(−β·log(π_θ/π_ref)) =
    (2/β)·E log(1 + (π_θ/π_ref)^β), which is the softplus form above. ALGORITHMS.md §1 "npo".
    Sequence log-probabilities are −seqNLL over the answer tokens (shifted mask); at θ = ref the
    loss is (2/β)·ln 2 and it falls toward 0 as π_θ(y|x) → 0, so unlike −NLL it is bounded below.

    Args:
        logits: (B, T, V) of the model being unlearned.
        labels: (B, T), -100 outside the answer.
        ref_logits: (B, T, V) of the frozen reference, detached here.
        beta: inverse temperature, > 0 (0.1, as open-unlearning's NPO.yaml).
        seq_weight: the loop's sequence-accumulation weight (module docstring).

    Returns:
        Scalar: seq_weight × the mean over rows with ≥ 1 answer token; 0 if there is none.

    Deviation from open-unlearning (``compute_dpo_loss`` with ``win_inputs=None``): rows without any
    answer token are left out of the mean instead of adding (2/β)·ln 2 each.
    """
    _check_positive("beta", beta)
    seq, n = sequence_nll(logits, labels)
    with torch.no_grad():
        ref_seq, _ = sequence_nll(ref_logits.detach(), labels)
    log_ratio = ref_seq - seq  # log π_θ(y|x) − log π_ref(y|x), since log π = −seqNLL
    per_row = (2.0 / beta) * F.softplus(beta * log_ratio)
    return seq_weight * _sequence_mean(per_row, n > 0)


def simnpo_loss(
    logits: Tensor, labels: Tensor, *, beta: float = 4.5, delta: float = 0.0, seq_weight: float = 1.0
) -> Tensor:
    """SimNPO forget loss: −(2/β)·mean_i log σ(β·(avgNLL_i − δ)), reference-free.

    Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning", arXiv:2410.07163, §4: NPO with π_ref removed and the log-likelihood normalised by
    the answer length, −(2/β)·E log σ(−(β/|y|)·log π_θ(y|x) − γ). ALGORITHMS.md §1 "simnpo".
    avgNLL_i = seqNLL_i / (answer tokens of row i), shifted mask. Minimising it raises avgNLL.

    Args:
        logits: (B, T, V); labels: (B, T), -100 outside the answer.
        beta: > 0 (4.5, open-unlearning's SimNPO.yaml). delta: margin on the avgNLL scale (0).
        seq_weight: the loop's sequence-accumulation weight (module docstring).

    Returns:
        Scalar: seq_weight × the mean over rows with ≥ 1 answer token; 0 if there is none.

    Convention: δ sits inside β as in open-unlearning (``β·(avgNLL − δ)``); the paper's margin γ
    sits outside, γ = β·δ. Deviations from open-unlearning: it divides by the count of *unshifted*
    labels (the same count unless position 0 is labelled, which ``collate`` never does) and a row
    without answer tokens gives 0/0 = NaN there; here that row is left out of the mean.
    """
    _check_positive("beta", beta)
    seq, n = sequence_nll(logits, labels)
    avg = seq / n.clamp_min(1.0)  # clamp: a row without answer tokens stays finite (0), then excluded
    per_row = -(2.0 / beta) * F.logsigmoid(beta * (avg - delta))
    return seq_weight * _sequence_mean(per_row, n > 0)


def idk_dpo_loss(
    logits_idk: Tensor,
    labels_idk: Tensor,
    ref_logits_idk: Tensor,
    logits_forget: Tensor,
    labels_forget: Tensor,
    ref_logits_forget: Tensor,
    *,
    beta: float = 0.1,
    seq_weight: float = 1.0,
) -> Tensor:
    """IdkDPO: DPO preferring a refusal y_idk over the forget answer y_f to the same question.

    −(2/β)·mean_i log σ(β·[(log π_θ − log π_ref)(y_idk,i) − (log π_θ − log π_ref)(y_f,i)]), with
    sequence log-probs = −seqNLL (shifted mask). Rafailov et al. 2023, "Direct Preference
    Optimization", arXiv:2305.18290, Eq. 7, as used for unlearning by TOFU (Maini et al. 2024,
    arXiv:2401.06121). ALGORITHMS.md §1 "idk_dpo". At θ = ref the loss is (2/β)·ln 2.

    Args:
        logits_idk, labels_idk, ref_logits_idk: (B, T₁, V), (B, T₁), (B, T₁, V): question + refusal.
        logits_forget, labels_forget, ref_logits_forget: (B, T₂, V), (B, T₂), (B, T₂, V): question +
            forget answer. Row i of both batches is the same question (paired). References detached.
        beta: > 0 (0.1, open-unlearning's DPO.yaml). seq_weight: module docstring.

    Returns:
        Scalar: seq_weight × the mean over pairs where both answers have ≥ 1 token; 0 if none.

    The 2/β factor follows open-unlearning's ``compute_dpo_loss`` and ALGORITHMS.md, not the DPO
    paper (which has none): it only rescales. Deviation from open-unlearning: pairs with an empty
    side are left out of the mean.
    """
    _check_positive("beta", beta)
    if logits_idk.shape[0] != logits_forget.shape[0]:
        raise ValueError(
            f"idk and forget batches must be paired row by row; got {logits_idk.shape[0]} and "
            f"{logits_forget.shape[0]} rows"
        )
    seq_idk, n_idk = sequence_nll(logits_idk, labels_idk)
    seq_f, n_f = sequence_nll(logits_forget, labels_forget)
    with torch.no_grad():
        ref_idk, _ = sequence_nll(ref_logits_idk.detach(), labels_idk)
        ref_f, _ = sequence_nll(ref_logits_forget.detach(), labels_forget)
    margin = (ref_idk - seq_idk) - (ref_f - seq_f)  # win log-ratio − lose log-ratio
    per_row = -(2.0 / beta) * F.logsigmoid(beta * margin)
    return seq_weight * _sequence_mean(per_row, (n_idk > 0) & (n_f > 0))


def idk_nll_loss(logits_idk: Tensor, labels_idk: Tensor, *, token_weight: float = 1.0) -> Tensor:
    """IdkNLL: NLL(θ; x, y_idk), the token-mean cross-entropy of refusal answers to forget questions.

    TOFU (Maini et al. 2024, arXiv:2401.06121) fine-tunes toward "I don't know" answers; this is
    ``nll_loss`` on the (question, refusal) batch. ALGORITHMS.md §1 "idk_nll".

    Args:
        logits_idk: (B, T, V); labels_idk: (B, T), -100 outside the refusal answer (shifted mask).
        token_weight: the loop's token-accumulation weight (module docstring).
    """
    return nll_loss(logits_idk, labels_idk, token_weight=token_weight)


def _hidden_distance(
    hidden: Tensor,
    target: Tensor,
    mask: Tensor,
    token_weight: float,
    hidden_reduction: Literal["mean", "sum"],
) -> Tensor:
    """Token mean over ``mask`` of ‖h − target‖² (÷ D for "mean"); ``target`` is (D,) or (B, T, D)."""
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (B, T, D) and mask (B, T); got {tuple(hidden.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        # An integer mask would index positions instead of selecting them.
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if hidden_reduction not in ("mean", "sum"):
        raise ValueError(f"hidden_reduction must be 'mean' or 'sum', got {hidden_reduction!r}")
    kept = hidden[mask].float()  # (K, D): only the answer positions are upcast
    target = target[mask] if target.dim() == 3 else target
    per_token = (kept - target.detach().float()).square().sum(-1)
    if hidden_reduction == "mean":
        per_token = per_token / hidden.shape[-1]
    return token_weight * per_token.sum() / mask.sum().clamp_min(1)


def rmu_forget_loss(
    hidden: Tensor,
    mask: Tensor,
    control: Tensor,
    *,
    token_weight: float = 1.0,
    hidden_reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """RMU forget loss: token mean over answer positions of ‖h_ℓ(θ) − c·u‖² (÷ D for "mean").

    Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning",
    arXiv:2403.03218, §5 (RMU): steer the layer-ℓ activations of forget tokens toward a fixed
    scaled random vector. ALGORITHMS.md §1 "rmu". ``hidden_reduction="mean"`` divides by D, the
    MSE of the WMDP code; "sum" is the squared norm as the paper writes it.

    Args:
        hidden: (B, T, D), layer-ℓ output of the model being unlearned.
        mask: (B, T) bool, the *unshifted* answer positions (``answer_mask(labels)``): a hidden
            state belongs to its own token, so there is no shift.
        control: (D,), c·u with u a fixed random unit vector and c the steering coefficient (the
            caller draws it; open-unlearning and WMDP normalise ``torch.rand``, a non-negative
            direction). Detached.
        token_weight: the loop's token-accumulation weight (module docstring).

    Returns:
        Scalar; 0 when the mask is empty.

    Deviations: open-unlearning (``compute_activation_loss``) takes a per-row token mean, then the
    mean over rows (NaN for a row without answer tokens); the WMDP code takes the MSE over every
    position, prompt and padding included. Here: token mean over the batch's answer tokens, the
    module's accumulation convention.
    """
    if control.shape != hidden.shape[-1:]:
        raise ValueError(f"control must be (D,) = {tuple(hidden.shape[-1:])}, got {tuple(control.shape)}")
    return _hidden_distance(hidden, control, mask, token_weight, hidden_reduction)


def rmu_retain_loss(
    hidden: Tensor,
    ref_hidden: Tensor,
    mask: Tensor,
    *,
    token_weight: float = 1.0,
    hidden_reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """RMU retain loss: token mean over answer positions of ‖h_ℓ(θ) − h_ℓ(ref)‖² (÷ D for "mean").

    Li et al. 2024, arXiv:2403.03218, §5 (RMU retain term; open-unlearning's ``EMBED_DIFF``).
    ALGORITHMS.md §1 "rmu", retain side.

    Args:
        hidden, ref_hidden: (B, T, D) layer-ℓ outputs of the model and of the frozen reference
            (detached) on the same retain batch.
        mask: (B, T) bool, unshifted answer positions (``answer_mask(labels)``).
        token_weight, hidden_reduction: as in ``rmu_forget_loss`` (same deviations).
    """
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden {tuple(ref_hidden.shape)} != hidden {tuple(hidden.shape)}")
    return _hidden_distance(hidden, ref_hidden, mask, token_weight, hidden_reduction)


def undial_loss(
    logits: Tensor, ref_logits: Tensor, labels: Tensor, *, beta: float = 10.0, token_weight: float = 1.0
) -> Tensor:
    """UNDIAL: soft cross-entropy of π_θ to softmax(z_ref − β·onehot(y)) on answer positions.

    Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large
    Language Models", arXiv:2402.10052: self-distillation toward the reference's logits with the
    true next token's logit lowered by β, so the target keeps the reference's ranking of every
    other token but moves mass off y. ALGORITHMS.md §1 "undial".
    Per position t: −Σ_k q_{t,k}·log π_θ(k), q_t = softmax(z_ref,t − β·e_{y_t}) (no gradient).

    Args:
        logits: (B, T, V); ref_logits: (B, T, V) of the frozen reference, detached.
        labels: (B, T), -100 outside the answer; shifted mask.
        beta: logit penalty on the true token (10, open-unlearning's UNDIAL.yaml).
        token_weight: the loop's token-accumulation weight (module docstring).

    Returns:
        Scalar token mean; 0 when no token is labelled.

    Deviation from open-unlearning (``compute_undial_loss``): it does not mask, averaging over every
    position incl. prompt and padding, where the label -100 lowers vocabulary entry V − 100
    (negative indexing); here only the positions that predict answer tokens count.
    """
    kept, target, _ = answer_positions(logits, labels)
    ref_kept, _, _ = answer_positions(ref_logits.detach(), labels)
    with torch.no_grad():
        idx = torch.arange(target.shape[0], device=target.device)
        penalty = torch.tensor(-beta, device=idx.device)
        adjusted = ref_kept.float().index_put((idx, target), penalty, accumulate=True)
        soft_target = F.softmax(adjusted, dim=-1)
    per_token = -(soft_target * F.log_softmax(kept.float(), dim=-1)).sum(-1)
    return token_weight * per_token.sum() / max(target.shape[0], 1)


def ceu_loss(
    logits: Tensor, labels: Tensor, *, ignore_first_n_answer_tokens: int = 1, token_weight: float = 1.0
) -> Tensor:
    """CE-U: soft cross-entropy of π_θ to softmax(z with the true token's logit set to −∞).

    Yang et al. 2025, "CE-U: Cross Entropy Unlearning", arXiv:2503.01224: the target is the model's
    own next-token distribution with y removed and renormalised, so the loss pushes mass off y
    while keeping the ranking of the rest. ALGORITHMS.md §1 "ceu". Per kept position:
    −Σ_k q_k·log π_θ(k), q = softmax(z.detach() with z_y = −∞), so q_y = 0. Shifted mask.

    As open-unlearning's ``compute_batch_ceu`` (matched): the target is detached (gradient flows
    only through log π_θ), and the first ``ignore_first_n_answer_tokens`` answer tokens of every
    row, counted on the unshifted labels, are not scored (the trick of the paper's training-settings
    footnote; 1 in open-unlearning's CEU.yaml).

    Args:
        logits: (B, T, V); labels: (B, T), -100 outside the answer.
        ignore_first_n_answer_tokens: ≥ 0.
        token_weight: the loop's token-accumulation weight (module docstring).

    Returns:
        Scalar token mean over the scored positions; 0 when there is none.
    """
    if ignore_first_n_answer_tokens < 0:
        raise ValueError(f"ignore_first_n_answer_tokens must be >= 0, got {ignore_first_n_answer_tokens}")
    answer = answer_mask(labels)
    first_n = answer & (answer.cumsum(dim=-1) <= ignore_first_n_answer_tokens)
    kept, target, _ = answer_positions(logits, labels.masked_fill(first_n, IGNORE_INDEX))
    kept = kept.float()
    with torch.no_grad():
        idx = torch.arange(target.shape[0], device=target.device)
        minus_inf = torch.tensor(float("-inf"), device=idx.device)
        suppressed = kept.detach().index_put((idx, target), minus_inf)
        soft_target = F.softmax(suppressed, dim=-1)
    per_token = -(soft_target * F.log_softmax(kept, dim=-1)).sum(-1)
    return token_weight * per_token.sum() / max(target.shape[0], 1)


def wga_loss(logits: Tensor, labels: Tensor, *, beta: float = 1.0, token_weight: float = 1.0) -> Tensor:
    """WGA (weighted gradient ascent): −mean_t p_t^β·ℓ_t, p_t = exp(−ℓ_t) detached.

    Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond",
    arXiv:2502.19301 (the G-effect paper): gradient ascent on each answer token's cross-entropy ℓ_t,
    reweighted by its (detached) probability so tokens already forgotten stop pulling the model
    toward collapse. ALGORITHMS.md §1 "wga". Matches open-unlearning's ``compute_wga_loss``.

    Args:
        logits: (B, T, V); labels: (B, T), -100 outside the answer; shifted mask.
        beta: weight exponent (1, open-unlearning's WGA.yaml).
        token_weight: the loop's token-accumulation weight (module docstring).

    Returns:
        Scalar token mean over answer tokens (≤ 0); 0 when no token is labelled.
    """
    kept, target, _ = answer_positions(logits, labels)
    token_nll = F.cross_entropy(kept.float(), target, reduction="none")
    weight = torch.exp(-token_nll.detach()).pow(beta)  # a weight, not a path for the gradient
    return -token_weight * (weight * token_nll).sum() / max(target.shape[0], 1)


def satimp_loss(
    logits: Tensor, labels: Tensor, *, beta1: float = 5.0, beta2: float = 1.0, token_weight: float = 1.0
) -> Tensor:
    """SatImp: −mean_t p_t^β1·(1 − p_t)^β2·ℓ_t, p_t = exp(−ℓ_t), weights detached.

    Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning",
    arXiv:2505.11953 (id as linked from open-unlearning's docs/links.md): gradient ascent reweighted
    by saturation (p^β1) and importance ((1 − p)^β2). ALGORITHMS.md §1 "satimp". Matches
    open-unlearning's ``compute_satimp_loss``.

    Args:
        logits: (B, T, V); labels: (B, T), -100 outside the answer; shifted mask.
        beta1, beta2: exponents (5 and 1, open-unlearning's SatImp.yaml).
        token_weight: the loop's token-accumulation weight (module docstring).

    Returns:
        Scalar token mean over answer tokens (≤ 0); 0 when no token is labelled.
    """
    kept, target, _ = answer_positions(logits, labels)
    token_nll = F.cross_entropy(kept.float(), target, reduction="none")
    p = torch.exp(-token_nll.detach())
    weight = p.pow(beta1) * (1.0 - p).pow(beta2)
    return -token_weight * (weight * token_nll).sum() / max(target.shape[0], 1)


def flatten_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    mask_alignment: Literal["shifted", "unshifted", "all_positions"] = "shifted",
    reduction: Literal["per_sequence", "per_token"] = "per_sequence",
    attention_mask: Tensor | None = None,
    weight: float = 1.0,
) -> Tensor:
    """Logit-margin flattening: mean of (max_k z_{t,k} − mean_k z_{t,k})² over scored positions.

    Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework for Large
    Language Models", arXiv:2506.05314 (id from open-unlearning's community/methods/PDU). The forget
    loss of PDU: softmax-free, ≥ 0, and exactly 0 iff every logit of a scored position is equal
    (a uniform output distribution). ALGORITHMS.md §1 "flatten".
    ∂/∂z_k of (max − mean)² = 2·(max − mean)·(1[k = argmax] − 1/V) (ties share the max's part).

    Args:
        logits: (B, T, V), any float dtype; only the scored positions are upcast to float32.
        labels: (B, T), -100 outside the answer.
        mask_alignment: which positions are scored (**[choice]**, default "shifted"):
            "shifted": ``logits[:, :-1]`` where ``labels[:, 1:] != -100``, the logits that produce
            the answer tokens, i.e. the distributions a user sees when the model answers;
            "unshifted": ``logits`` where ``labels != -100``, the answer tokens' own positions
            (open-unlearning's ``PDU.compute_loss``), which score the prediction *after* each
            answer token and miss the one producing the first;
            "all_positions": every position, or only the 1s of ``attention_mask`` when given (the
            authors' run script also scored prompt and padding).
        reduction: (**[choice]**, default "per_sequence") "per_sequence": mean over each row's
            positions, then over rows with ≥ 1 position, so every forget fact weighs the same
            whatever its answer length; "per_token": mean over all scored positions of the batch.
        attention_mask: (B, T), used by "all_positions" only; the labels already exclude prompt and
            padding for the other two alignments, where it is ignored.
        weight: the loop's accumulation weight. The caller picks the one matching ``reduction``:
            ``seq_weight`` for per_sequence, ``token_weight`` for per_token (module docstring).

    Returns:
        Scalar; 0 when no position is scored.

    ``mask_alignment="unshifted", reduction="per_token"`` reproduces open-unlearning's PDU loss
    (which computes it in the model's dtype over every position before masking).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if mask_alignment == "shifted":
        z, mask = logits[:, :-1], labels[:, 1:] != IGNORE_INDEX
    elif mask_alignment == "unshifted":
        z, mask = logits, answer_mask(labels)
    elif mask_alignment == "all_positions":
        z = logits
        if attention_mask is None:
            mask = torch.ones_like(labels, dtype=torch.bool)
        elif attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != labels {tuple(labels.shape)}")
        else:
            mask = attention_mask.bool()
    else:
        raise ValueError(
            f"mask_alignment must be 'shifted', 'unshifted' or 'all_positions', got {mask_alignment!r}"
        )
    if reduction not in ("per_sequence", "per_token"):
        raise ValueError(f"reduction must be 'per_sequence' or 'per_token', got {reduction!r}")

    kept = z[mask].float()  # (K, V)
    # mean_k(max − z_k) rather than max − mean_k z_k: equal in exact arithmetic, but this one is
    # exactly 0 (value and gradient) when all logits are equal, where the float mean can be off by an ulp.
    per_position = (kept.amax(dim=-1, keepdim=True) - kept).mean(dim=-1).square()
    if reduction == "per_token":
        return weight * per_position.sum() / max(per_position.shape[0], 1)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(
        0, rows, per_position
    )
    counts = torch.bincount(rows, minlength=labels.shape[0]).float()
    return weight * _sequence_mean(sums / counts.clamp_min(1.0), counts > 0)
