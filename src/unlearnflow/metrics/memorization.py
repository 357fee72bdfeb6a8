"""Token-level memorisation metrics on the argmax predictions of one forward pass (pure numpy).

Both read ``TokenStats.correct[TokenStats.content]``: whether the model's argmax next-token
prediction equals each target token, the final EOS left out (open-unlearning also leaves it out:
predicting the end of an answer says nothing about having memorised it).
"""

from __future__ import annotations

import numpy as np


def exact_memorization(correct: np.ndarray) -> float:
    """Fraction of target tokens whose argmax prediction equals the token (Tirumala et al. 2022).

    EM = (1/|y|) Σ_t 1[argmax_v p(v | x, y_<t) = y_t]; open-unlearning ``exact_memorization``.

    Args:
        correct: (n,) booleans, one per target token.

    Returns:
        EM in [0, 1]; NaN for an empty target.
    """
    correct = np.asarray(correct, dtype=bool)
    return float(correct.mean()) if correct.size else float("nan")


def extraction_strength(correct: np.ndarray, *, definitions: str = "reference") -> float:
    """ES = 1 − k/|y|, k the smallest index from which every argmax prediction is right to the end.

    Carlini et al.'s extraction notion as open-unlearning's ``extraction_strength`` (Wang et al.
    2025, arXiv:2503.01854): the shortest true prefix after which the model reproduces the rest.
    ES = 1 when the whole target is predicted.

    The two ``definitions`` differ only when the last token is wrong (no suffix is reproduced):

    * ``"reference"``: open-unlearning's loop ``for k in range(|y|): … break`` leaves k = |y| − 1
      when no suffix matches, so ES = 1/|y| (and an empty target scores 0, as it does there).
      E.g. hits [1, 1, 0]: k = 2, ES = 1/3.
    * ``"unlearnflow"``: k = |y| by the definition, ES = 0 (NaN for an empty target).

    Args:
        correct: (n,) booleans, one per target token.
        definitions: ``"reference"`` or ``"unlearnflow"``.

    Returns:
        ES in [0, 1].
    """
    if definitions not in ("reference", "unlearnflow"):
        raise ValueError(f"definitions must be one of reference, unlearnflow; got {definitions!r}")
    correct = np.asarray(correct, dtype=bool)
    n = correct.size
    if n == 0:
        return 0.0 if definitions == "reference" else float("nan")
    wrong = np.flatnonzero(~correct)
    k = int(wrong[-1]) + 1 if wrong.size else 0  # the suffix after the last wrong token is all right
    if definitions == "reference":
        k = min(k, n - 1)  # the reference's loop variable stops at its last value, |y| − 1
    return 1.0 - k / n
