"""TOFU metric maths (metrics/tofu.py) and the summary (suite.summary_metrics) on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unlearnflow.metrics import summary_metrics, tofu

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


def test_summary_metrics_without_oracle_is_nan_and_utility_is_hmean():
    """retain prob 1, rouge 0.5, truth ratio 0.5 → hmean = 3 / (1 + 2 + 2) = 0.6; world_facts is
    absent from the aggregates and skipped; no oracle → forget quality NaN (undefined, not 0)."""
    aggregates = {"retain_prob": 1.0, "retain_rouge": 0.5, "retain_truth_ratio": 0.5, "forget_prob": 0.01}
    out = summary_metrics(aggregates, np.array([0.5, 1.0]), None, ["retain", "world_facts"])
    assert math.isnan(out["forget_quality"])
    assert out["model_utility"] == pytest.approx(0.6)


def test_summary_metrics_forget_quality_vs_oracle():
    """Same KS case as above: separated samples of sizes 3 and 3 → p = 0.1."""
    out = summary_metrics({}, np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]), ["retain"])
    assert out["forget_quality"] == pytest.approx(0.1)
    assert math.isnan(out["model_utility"])
