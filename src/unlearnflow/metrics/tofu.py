"""TOFU metric maths on precomputed per-sample numbers (pure numpy / scipy, no model).

Definitions follow ALGORITHMS.md §5, which follows TOFU (Maini et al. 2024, arXiv:2401.06121,
§2.2 "Evaluation metrics") as implemented in locuslab/open-unlearning
(``src/evals/metrics/memorization.py``, ``utils.py``). avgNLL is the mean answer-token negative
log-likelihood of one (question, answer) pair, as ``scoring.TokenStats.avg_nll`` gives it.

``definitions`` (``evaluate.definitions``) picks between the reference's formulas and ours:

* ``"reference"`` (default): open-unlearning's, ``+ 1e-10`` guards included where it puts them
  (``memorization.py``: ``probability_w_options`` and ``truth_ratio``). On a healthy model the
  guards move values by ~1e-10; on a collapsed one (every probability ~1e-11) they dominate.
* ``"unlearnflow"``: the unguarded formulas (pure ratios of probabilities).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFINITIONS = ("reference", "unlearnflow")
GUARD = 1e-10  # open-unlearning's additive guard in denominators (memorization.py)


def _guard(definitions: str) -> float:
    """The additive denominator guard of ``definitions`` (one-line ValueError on an unknown name)."""
    if definitions not in DEFINITIONS:
        raise ValueError(f"definitions must be one of {', '.join(DEFINITIONS)}; got {definitions!r}")
    return GUARD if definitions == "reference" else 0.0


def _check_correct_wrong(nll_correct: np.ndarray, nll_wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    correct = np.asarray(nll_correct, dtype=np.float64)
    wrong = np.asarray(nll_wrong, dtype=np.float64)
    if correct.ndim != 1 or wrong.ndim != 2 or wrong.shape[0] != correct.shape[0] or wrong.shape[1] < 1:
        raise ValueError(
            f"expected nll_correct (N,) and nll_wrong (N, K>=1); got {correct.shape}, {wrong.shape}"
        )
    return correct, wrong


def prob(avg_nll: np.ndarray) -> np.ndarray:
    """Length-normalised answer probability P = exp(−avgNLL) (TOFU "Probability", forget/retain sets).

    Args:
        avg_nll: (N,) avgNLL of the answer per sample.

    Returns:
        (N,) probabilities in (0, 1].
    """
    return np.exp(-np.asarray(avg_nll, dtype=np.float64))


def normalized_option_prob(
    nll_correct: np.ndarray, nll_wrong: np.ndarray, *, definitions: str = "reference"
) -> np.ndarray:
    """TOFU probability on the real-authors / world-facts splits: P_c / (P_c + Σ_k P_k), P = exp(−avgNLL).

    The correct answer's length-normalised probability, renormalised over the answer options
    (the correct one and its K perturbed versions); arXiv:2401.06121 §2.2. ``"reference"`` adds
    open-unlearning's guard, P_c / (P_c + Σ_k P_k + 1e-10) (``probability_w_options``), so a
    collapsed model whose options all have P ~ 1e-11 scores near 0, not the ratio of vanishing
    numbers.

    Args:
        nll_correct: (N,) avgNLL of the correct answer.
        nll_wrong: (N, K) avgNLL of the K wrong answers.
        definitions: ``"reference"`` (guarded) or ``"unlearnflow"`` (unguarded).

    Returns:
        (N,) values in [0, 1).
    """
    guard = _guard(definitions)
    correct, wrong = _check_correct_wrong(nll_correct, nll_wrong)
    p_correct = np.exp(-correct)
    return p_correct / (p_correct + np.exp(-wrong).sum(axis=1) + guard)


def truth_ratio(
    nll_correct: np.ndarray, nll_wrong: np.ndarray, *, definitions: str = "reference"
) -> np.ndarray:
    """Per-sample truth ratio tr = P_wrong / P_correct.

    P_wrong is the geometric mean of the wrong answers' probabilities, exp(−mean_k avgNLL_k), and
    P_correct = exp(−avgNLL_correct) (arXiv:2401.06121 eq. 1; open-unlearning ``truth_ratio``).
    On the forget split "correct" is the paraphrased answer.

    ``"unlearnflow"``: exp(avgNLL_correct − mean_k avgNLL_wrong_k), the pure ratio.
    ``"reference"``: P_wrong / (P_correct + 1e-10), open-unlearning's guard. Identical on a healthy
    model; on a collapsed one the guard dominates: avgNLL 25 (correct) and 25.5 (wrong) give
    e^−25.5 / (e^−25 + 1e-10) = 0.0740 instead of e^−0.5 = 0.607.

    Args:
        nll_correct: (N,) avgNLL of the correct (paraphrased) answer.
        nll_wrong: (N, K) avgNLL of the K perturbed answers.
        definitions: ``"reference"`` (guarded) or ``"unlearnflow"`` (unguarded).

    Returns:
        (N,) truth ratios in [0, ∞); 1 means the model cannot tell correct from wrong.
    """
    guard = _guard(definitions)
    correct, wrong = _check_correct_wrong(nll_correct, nll_wrong)
    if not guard:
        return np.exp(correct - wrong.mean(axis=1))
    return np.exp(-wrong.mean(axis=1)) / (np.exp(-correct) + guard)


def truth_ratio_forget(tr: np.ndarray, *, definitions: str = "reference") -> float:
    """Forget-split aggregate mean(min(tr, 1/tr)): 1 when tr = 1 (no preference either way).

    ``"reference"``: mean(min(tr, 1/(tr + 1e-10))), open-unlearning's ``closer_to_1_better``
    (finite when a guarded tr is 0).
    """
    guard = _guard(definitions)
    tr = np.asarray(tr, dtype=np.float64)
    return float(np.mean(np.minimum(tr, 1.0 / (tr + guard))))


def truth_ratio_utility(tr: np.ndarray) -> float:
    """Retain / utility aggregate mean(max(0, 1 − tr)): high when correct answers are preferred."""
    tr = np.asarray(tr, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


def forget_quality(tr_model: np.ndarray, tr_oracle: np.ndarray) -> float:
    """TOFU forget quality: p-value of the two-sample KS test between per-sample forget truth ratios.

    Compares the raw truth ratios of the evaluated model with those of the retain (oracle) model
    trained without D_f (arXiv:2401.06121 §2.2; open-unlearning ``ks_test``). High p-value: the
    two distributions cannot be told apart.

    Args:
        tr_model: (N,) forget-split truth ratios of the evaluated model.
        tr_oracle: (M,) the same for the oracle.

    Returns:
        ``scipy.stats.ks_2samp(tr_model, tr_oracle).pvalue`` (scipy's default: exact for small samples).
    """
    from scipy import stats  # here, not at import: scipy.stats costs seconds to load

    return float(stats.ks_2samp(np.asarray(tr_model, float), np.asarray(tr_oracle, float)).pvalue)


def model_utility(values: Mapping[str, float]) -> float:
    """TOFU model utility: harmonic mean of the utility sub-metrics (arXiv:2401.06121 §2.2).

    Args:
        values: sub-metric name → value ≥ 0 (e.g. ``retain_prob``, ``world_facts_rouge``).

    Returns:
        ``scipy.stats.hmean`` of the values; 0 if any value is 0.

    Raises:
        ValueError: no values, or a value that is NaN or negative (the message names its key).
    """
    if not values:
        raise ValueError("model_utility needs at least one value")
    for key, value in values.items():
        if math.isnan(value) or value < 0:
            raise ValueError(f"model_utility: {key} = {value} (must be a number >= 0)")
    if any(v == 0 for v in values.values()):
        return 0.0
    from scipy import stats

    return float(stats.hmean(list(values.values())))


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    """``RougeScorer(["rougeL"], use_stemmer=True)``, its Porter stemmer memoised per word.

    ``rouge-score``'s default tokenizer with stemming lower-cases, splits on non-alphanumerics and
    stems every word longer than 3 characters with nltk's ``PorterStemmer()``; the stemmer is a pure
    function of the word, and answers repeat their words, so each word is stemmed once. The tokens,
    hence every score, are those of ``use_stemmer=True``.
    """
    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize, tokenizers

    class MemoStemmer:
        def __init__(self) -> None:
            self.stem = functools.lru_cache(maxsize=65536)(porter.PorterStemmer().stem)

    class StemmingTokenizer(tokenizers.Tokenizer):
        def __init__(self) -> None:
            self._stemmer = MemoStemmer()

        def tokenize(self, text: str) -> list[str]:
            return tokenize.tokenize(text, self._stemmer)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=StemmingTokenizer())


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference (TOFU's ROUGE; Porter stemming).

    Recall = LCS(prediction, reference) / |reference| in tokens, as ``rouge-score``'s
    ``RougeScorer(["rougeL"], use_stemmer=True)`` computes it.
    """
    return _rouge_l(predictions, references, "recall")


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (MUSE's verbmem and knowmem; stemming).

    F1 = 2PR / (P + R) with P = LCS / |prediction| and R = LCS / |reference| (``rouge-score``'s
    ``fmeasure``; MUSE, Shi et al. 2024, arXiv:2407.06460 §3).
    """
    return _rouge_l(predictions, references, "fmeasure")


def _rouge_l(predictions: Sequence[str], references: Sequence[str], field: str) -> list[float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _rouge_scorer()
    return [
        float(getattr(scorer.score(ref, pred)["rougeL"], field))
        for pred, ref in zip(predictions, references, strict=True)
    ]
