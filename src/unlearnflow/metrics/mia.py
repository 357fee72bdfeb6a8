"""Membership-inference scores, their ROC-AUC, and MUSE's privleak (pure numpy / scikit-learn).

Convention (ALGORITHMS.md §5): every score is *member-likeness*, higher = more likely a training
member. open-unlearning scores the other way round (its ``loss`` score is the loss) and labels
the forget set 0; both give the same AUC: 1 when the forget set looks far more "member" than the
holdout set, 0.5 when the two cannot be told apart.

Token statistics are ``scoring.TokenStats`` from the single batched pass: ``logprobs`` of the
target tokens with the final EOS left out (``content``) for the token-level attacks, and the
avgNLL over every target token (EOS included) for ``loss``, ``zlib`` and ``reference`` — as
open-unlearning computes them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

MIN_K_FRACTION = 0.4  # open-unlearning's and MUSE's k for Min-K% and Min-K%++


def loss_score(avg_nll: np.ndarray) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018): −avgNLL."""
    return -np.asarray(avg_nll, dtype=np.float64)


def zlib_score(avg_nll: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """zlib attack (Carlini et al. 2021): −avgNLL / zlib-compressed size of the text in bytes.

    Dividing by the text's zlib entropy discounts texts that are likely merely because they are
    repetitive or simple. Which text is compressed is the caller's choice (``evaluate.definitions``):
    open-unlearning's ``ZLIBAttack`` compresses the scored label tokens decoded without special
    tokens (``extract_target_texts_from_processed_data``), which keeps an answer's leading space
    ("reference"); ``"unlearnflow"`` compresses the row's raw answer text.

    Args:
        avg_nll: (N,) avgNLL of each target.
        texts: N texts whose UTF-8 bytes are compressed.

    Returns:
        (N,) member-likeness scores.
    """
    sizes = np.array([max(len(zlib.compress(t.encode("utf-8"))), 1) for t in texts], dtype=np.float64)
    return -np.asarray(avg_nll, dtype=np.float64) / sizes


def _lowest_fraction_mean(values: np.ndarray, k: float) -> float:
    if values.size == 0:
        return float("nan")
    n = max(1, int(values.size * k))
    return float(np.sort(values)[:n].mean())


def min_k_score(logprobs: np.ndarray, k: float = MIN_K_FRACTION) -> float:
    """Min-K% Prob (Shi et al. 2024, arXiv:2310.16789): mean of the lowest ⌊k·n⌋ (≥ 1) token log-probs.

    A member has few surprising tokens, so even its least likely tokens are fairly likely.
    """
    return _lowest_fraction_mean(np.asarray(logprobs, dtype=np.float64), k)


def min_k_pp_score(logprobs: np.ndarray, mu: np.ndarray, var: np.ndarray, k: float = MIN_K_FRACTION) -> float:
    """Min-K%++ (Zhang et al. 2025, arXiv:2404.02936): Min-K% on z = (log p(x_t) − μ_t) / σ_t.

    μ_t and σ_t² are the mean and variance of log p(v) under the model's own next-token
    distribution at position t; a training token is a local maximum of the likelihood, so it
    stands out above that mean. σ² is clamped at 1e-6 (open-unlearning's guard).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    z = (lp - np.asarray(mu, dtype=np.float64)) / np.sqrt(np.maximum(np.asarray(var, dtype=np.float64), 1e-6))
    return _lowest_fraction_mean(z, k)


def reference_score(avg_nll: np.ndarray, reference_avg_nll: np.ndarray) -> np.ndarray:
    """Reference attack (Carlini et al. 2022; open-unlearning ``ref``): avgNLL_ref − avgNLL_model.

    Calibrates the loss by a reference model's loss on the same text, so texts that are easy for
    any model do not look like members. Our reference is the oracle (retain) model, as MUSE's
    ``mia_reference`` uses the retrained model.
    """
    return np.asarray(reference_avg_nll, dtype=np.float64) - np.asarray(avg_nll, dtype=np.float64)


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC-AUC of telling members (label 1) from non-members (label 0) by a member-likeness score.

    ``sklearn.metrics.roc_auc_score``; ties count one half. NaN scores are an error.
    """
    from sklearn.metrics import roc_auc_score  # here, not at import: scikit-learn costs seconds to load

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"AUC needs members and non-members; got {m.size} and {n.size}")
    scores = np.concatenate([m, n])
    if np.isnan(scores).any():
        raise ValueError("AUC: some membership scores are NaN (targets without tokens?)")
    return float(roc_auc_score(np.r_[np.ones(m.size), np.zeros(n.size)], scores))


def privleak(auc_model: float, auc_oracle: float | None) -> float:
    """MUSE's PrivLeak (Shi et al. 2024, arXiv:2407.06460 §3; open-unlearning ``privleak``).

    PrivLeak = (AUC'_model − AUC'_oracle) / AUC'_oracle × 100 with AUC' = 1 − AUC: the AUC of
    labelling the *holdout* set positive (MUSE's orientation). A model that still holds D_f ranks
    forget items as members, AUC' → 0 and PrivLeak → −100; the oracle gives 0; positive values
    mean over-unlearning (forget data now looks *less* familiar than unseen data). Without an
    oracle AUC'_oracle = 0.5.

    Args:
        auc_model: the model's Min-K% AUC (forget = members), as ``auc`` returns it.
        auc_oracle: the oracle's, or None.
    """
    model = 1.0 - auc_model
    ref = 0.5 if auc_oracle is None else 1.0 - auc_oracle
    return (model - ref) / (ref + 1e-10) * 100.0
