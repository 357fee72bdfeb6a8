"""Metric maths (metrics/tofu.py, memorization.py, mia.py) on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unlearnflow.metrics import memorization, mia, tofu

LN2, LN4 = math.log(2.0), math.log(4.0)


def test_prob_is_exp_minus_avg_nll():
    """avgNLL [0, ln 2] → exp(−·) = [1, 0.5]."""
    np.testing.assert_allclose(tofu.prob(np.array([0.0, LN2])), [1.0, 0.5])


def test_normalized_option_prob_hand_values():
    """Row 0: P_c = e^−ln2 = 0.5, P_wrong = [0.25, 0.25] → 0.5 / (0.5 + 0.5) = 0.5.
    Row 1: P_c = 1, P_wrong = [0.5, 0.25] → 1 / 1.75 = 4/7."""
    got = tofu.normalized_option_prob(np.array([LN2, 0.0]), np.array([[LN4, LN4], [LN2, LN4]]))
    np.testing.assert_allclose(got, [0.5, 4.0 / 7.0])


def test_truth_ratio_uses_geometric_mean_of_wrong_probs():
    """Row 0: exp(ln2 − mean(ln4, ln4)) = exp(−ln2) = 0.5.
    Row 1: wrong P = [1, 0.25] → geometric mean 0.5 (not the arithmetic 0.625); P_c = 0.25 → tr = 2."""
    got = tofu.truth_ratio(np.array([LN2, LN4]), np.array([[LN4, LN4], [0.0, LN4]]))
    np.testing.assert_allclose(got, [0.5, 2.0])


def test_truth_ratio_rejects_bad_shapes():
    with pytest.raises(ValueError, match="nll_wrong"):
        tofu.truth_ratio(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="nll_wrong"):
        tofu.normalized_option_prob(np.zeros(3), np.zeros((2, 4)))


def test_truth_ratio_forget_aggregate():
    """tr [0.5, 2] → min(tr, 1/tr) = [0.5, 0.5] → mean 0.5; tr = 1 (no preference) → 1."""
    assert tofu.truth_ratio_forget(np.array([0.5, 2.0])) == pytest.approx(0.5)
    assert tofu.truth_ratio_forget(np.array([1.0])) == pytest.approx(1.0)


def test_truth_ratio_utility_aggregate():
    """tr [0.5, 2] → max(0, 1 − tr) = [0.5, 0] → mean 0.25."""
    assert tofu.truth_ratio_utility(np.array([0.5, 2.0])) == pytest.approx(0.25)


def test_forget_quality_exact_ks_pvalue():
    """Fully separated samples of sizes 3 and 3: D = 1, reached by 2 of the C(6,3) = 20 equally
    likely orderings (all of one sample below all of the other, either way) → exact p = 2/20 = 0.1.
    Identical samples: D = 0 → p = 1."""
    assert tofu.forget_quality(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])) == pytest.approx(0.1)
    assert tofu.forget_quality(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)


def test_model_utility_harmonic_mean():
    """hmean(1, 0.5) = 2 / (1/1 + 1/0.5) = 2/3; any zero → 0."""
    assert tofu.model_utility({"a": 1.0, "b": 0.5}) == pytest.approx(2.0 / 3.0)
    assert tofu.model_utility({"a": 1.0, "b": 0.0}) == 0.0


def test_model_utility_rejects_nan_naming_the_key():
    with pytest.raises(ValueError, match="retain_rouge"):
        tofu.model_utility({"retain_prob": 0.5, "retain_rouge": math.nan})
    with pytest.raises(ValueError, match="at least one"):
        tofu.model_utility({})


def test_rouge_l_recall_hand_values():
    """Reference "the cat sat on the mat" (6 tokens), prediction "the cat sat": LCS 3 → recall 3/6.
    Stemming: "running" and "runs" both stem to "run" → LCS 1 of "she runs daily" → 1/3.
    Empty prediction → 0."""
    got = tofu.rouge_l_recall(
        ["the cat sat", "running", ""], ["the cat sat on the mat", "she runs daily", "x y"]
    )
    np.testing.assert_allclose(got, [0.5, 1.0 / 3.0, 0.0])
    assert all(isinstance(v, float) for v in got)
    with pytest.raises(ValueError, match="references"):
        tofu.rouge_l_recall(["a"], [])


def test_rouge_l_f1_hand_value():
    """LCS("the cat sat", "the cat sat on the mat") = 3: P = 1, R = 1/2, F1 = 2/3."""
    got = tofu.rouge_l_f1(["the cat sat", "dog"], ["the cat sat on the mat", "cat"])
    assert got == pytest.approx([2 / 3, 0.0])


# --- memorisation ---------------------------------------------------------------------------------


def test_exact_memorization_is_the_fraction_of_argmax_hits():
    assert memorization.exact_memorization(np.array([True, False, True, True])) == pytest.approx(0.75)
    assert math.isnan(memorization.exact_memorization(np.zeros(0, bool)))


@pytest.mark.parametrize(
    ("correct", "expected"),
    [
        ([True, True, True], 1.0),  # k = 0: the whole answer is reproduced
        ([False, True, True], 2 / 3),  # k = 1
        ([False, False, True, True], 0.5),  # k = 2
        ([True, False, True, True], 0.5),  # a miss in the middle: the suffix starts after it
        ([True, True, False], 0.0),  # last token wrong: k = |y| (open-unlearning would give 1/3)
    ],
)
def test_extraction_strength_hand_values(correct, expected):
    assert memorization.extraction_strength(np.array(correct)) == pytest.approx(expected)


# --- membership inference ---------------------------------------------------------------------


def test_loss_zlib_and_reference_scores():
    """loss = −avgNLL; zlib divides by the compressed size (12 bytes for "aaaa", 28 for the
    sentence); reference = avgNLL_ref − avgNLL_model."""
    nll = np.array([2.0, 1.4])
    np.testing.assert_allclose(mia.loss_score(nll), [-2.0, -1.4])
    np.testing.assert_allclose(mia.zlib_score(nll, ["aaaa", "The cat sat on the mat."]), [-2 / 12, -1.4 / 28])
    np.testing.assert_allclose(mia.reference_score(np.array([0.5, 2.5]), np.array([1.0, 2.0])), [0.5, -0.5])


def test_min_k_takes_the_lowest_fraction_of_token_logprobs():
    """k = 0.4 of 5 tokens → the 2 lowest (−5, −4) → −4.5; k = 0.1 → at least one token → −5."""
    lp = np.array([-1.0, -3.0, -5.0, -2.0, -4.0])
    assert mia.min_k_score(lp, 0.4) == pytest.approx(-4.5)
    assert mia.min_k_score(lp, 0.1) == pytest.approx(-5.0)
    assert math.isnan(mia.min_k_score(np.zeros(0)))


def test_min_k_pp_standardises_by_the_predictive_distribution():
    """z = [(−1 + 1.5)/0.5, (−2 + 1.5)/1] = [1, −0.5]; k = 0.4 of 2 → 1 token → −0.5. A zero
    variance is clamped to 1e-6 (σ = 1e-3)."""
    lp, mu = np.array([-1.0, -2.0]), np.array([-1.5, -1.5])
    assert mia.min_k_pp_score(lp, mu, np.array([0.25, 1.0]), 0.4) == pytest.approx(-0.5)
    assert mia.min_k_pp_score(np.array([-1.0]), np.array([-1.001]), np.array([0.0]), 0.4) == pytest.approx(
        1.0
    )


def test_auc_counts_ties_as_half():
    """Members [3, 2] vs non-members [1, 2]: 3 wins + 1 tie of 4 pairs → 0.875."""
    assert mia.auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="NaN"):
        mia.auc(np.array([np.nan]), np.array([1.0]))


def test_privleak_muse_convention():
    """AUC' = 1 − AUC. Model AUC 0.875 without oracle: (0.125 − 0.5)/0.5 = −75; the oracle against
    itself gives 0; model 0.5 vs oracle 0.25: (0.5 − 0.75)/0.75 = −33.3."""
    assert mia.privleak(0.875, None) == pytest.approx(-75.0)
    assert mia.privleak(0.3, 0.3) == pytest.approx(0.0)
    assert mia.privleak(0.5, 0.25) == pytest.approx(-100 / 3)
