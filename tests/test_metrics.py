"""Metric maths (metrics/tofu.py, memorization.py, mia.py) on hand-computed values."""

from __future__ import annotations

import math
import zlib

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


E25, E255 = math.exp(-25.0), math.exp(-25.5)  # probabilities of a collapsed model (avgNLL 25, 25.5)


def test_truth_ratio_collapsed_model_reference_guard():
    """Correct avgNLL 25, wrong 25.5 (a gradient-ascent-collapsed model).
    reference: P_w / (P_c + 1e-10) = e^−25.5 / (e^−25 + 1e-10) = 8.4235e-12 / 1.13888e-10 = 0.073963;
    unlearnflow: exp(25 − 25.5) = e^−0.5 = 0.60653. Forget aggregate min(tr, 1/(tr + guard)) follows:
    0.073963 vs 0.60653."""
    nll_c, nll_w = np.array([25.0]), np.array([[25.5]])
    ref = tofu.truth_ratio(nll_c, nll_w)  # the default is the reference's definition
    ours = tofu.truth_ratio(nll_c, nll_w, definitions="unlearnflow")
    assert ref[0] == pytest.approx(E255 / (E25 + 1e-10), rel=1e-12)
    assert ref[0] == pytest.approx(0.0739627, rel=1e-6)
    assert ours[0] == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert tofu.truth_ratio_forget(ref) == pytest.approx(0.0739627, rel=1e-6)
    assert tofu.truth_ratio_forget(ours, definitions="unlearnflow") == pytest.approx(0.6065307, rel=1e-6)


def test_truth_ratio_healthy_model_definitions_agree_to_1e10():
    """avgNLL ~1: P ~ 0.37, so the 1e-10 guard moves tr by ~1e-10 relative (parity on healthy models).
    Rows: exp(ln2 − ln4) = 0.5 and exp(1 − 1.5) = e^−0.5."""
    nll_c, nll_w = np.array([LN2, 1.0]), np.array([[LN4, LN4], [1.0, 2.0]])
    ref = tofu.truth_ratio(nll_c, nll_w)
    ours = tofu.truth_ratio(nll_c, nll_w, definitions="unlearnflow")
    np.testing.assert_allclose(ours, [0.5, math.exp(-0.5)], rtol=1e-12)
    np.testing.assert_allclose(ref, ours, rtol=1e-9)
    assert not np.array_equal(ref, ours)  # the guard is there, just tiny


def test_truth_ratio_forget_reference_guard_keeps_a_zero_tr_finite():
    """A guarded tr can be exactly 0 (P_wrong underflows: avgNLL 800 → e^−800 = 0 in float64):
    the reference's min(tr, 1/(tr + 1e-10)) = min(0, 1e10) = 0, with no division by zero."""
    tr = tofu.truth_ratio(np.array([1.0]), np.array([[800.0]]))
    assert tr[0] == 0.0
    with np.errstate(divide="raise"):
        assert tofu.truth_ratio_forget(tr) == 0.0


def test_normalized_option_prob_collapsed_model_reference_guard():
    """Correct and two wrong options all at avgNLL 25 (P = e^−25 = 1.3888e-11 each).
    reference: P_c / (P_c + ΣP_w + 1e-10) = 1.3888e-11 / 1.41664e-10 = 0.098035;
    unlearnflow: 1/3."""
    nll_c, nll_w = np.array([25.0]), np.array([[25.0, 25.0]])
    ref = tofu.normalized_option_prob(nll_c, nll_w)
    ours = tofu.normalized_option_prob(nll_c, nll_w, definitions="unlearnflow")
    assert ref[0] == pytest.approx(E25 / (3 * E25 + 1e-10), rel=1e-12)
    assert ref[0] == pytest.approx(0.0980345, rel=1e-6)
    assert ours[0] == pytest.approx(1 / 3, rel=1e-12)


def test_unknown_definitions_are_rejected():
    with pytest.raises(ValueError, match="reference, unlearnflow"):
        tofu.truth_ratio(np.zeros(1), np.zeros((1, 1)), definitions="tofu")
    with pytest.raises(ValueError, match="reference, unlearnflow"):
        memorization.extraction_strength(np.array([True]), definitions="tofu")


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
    ("correct", "reference", "unlearnflow"),
    [
        ([True, True, True], 1.0, 1.0),  # k = 0: the whole answer is reproduced
        ([False, True, True], 2 / 3, 2 / 3),  # k = 1
        ([False, False, True, True], 0.5, 0.5),  # k = 2
        ([True, False, True, True], 0.5, 0.5),  # a miss in the middle: the suffix starts after it
        ([False, True, False, True], 0.25, 0.25),  # only the last token reproduced: k = 3
        # last token wrong: the reference's loop leaves k = |y| − 1 → 1/|y|; by the definition k = |y| → 0
        ([True, True, False], 1 / 3, 0.0),
        ([False] * 4, 1 / 4, 0.0),
        ([False], 1.0, 0.0),  # |y| = 1: the reference's k stays 0 → ES = 1
    ],
)
def test_extraction_strength_hand_values(correct, reference, unlearnflow):
    """ES = 1 − k/|y|; the two definitions differ exactly when the last token is wrong."""
    assert memorization.extraction_strength(np.array(correct)) == pytest.approx(reference)
    assert memorization.extraction_strength(np.array(correct), definitions="unlearnflow") == pytest.approx(
        unlearnflow
    )


def test_extraction_strength_of_an_empty_target():
    """The reference appends score 0 for a target without tokens; ours is undefined (NaN)."""
    assert memorization.extraction_strength(np.zeros(0, bool)) == 0.0
    assert math.isnan(memorization.extraction_strength(np.zeros(0, bool), definitions="unlearnflow"))


# --- membership inference ---------------------------------------------------------------------


def test_zlib_score_of_a_leading_space_text():
    """zlib.compress(b" Paris.") is 15 bytes, b"Paris." 14: the reference compresses the decoded
    label tokens, which keep the answer's leading space, so its score is −avgNLL/15, ours −avgNLL/14."""
    assert len(zlib.compress(b" Paris.")) == 15 and len(zlib.compress(b"Paris.")) == 14
    np.testing.assert_allclose(
        mia.zlib_score(np.array([3.0, 3.0]), [" Paris.", "Paris."]), [-3 / 15, -3 / 14]
    )


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


# --- the warning when membership inference has no non-members (issue 12) ---------------------------


def _custom_bench(tmp_path, holdout: bool = False):
    """A user's own QA forget / retain files (and optionally a holdout), loaded as the pipeline does."""
    from unlearnflow.config import BenchmarkConfig
    from unlearnflow.data import custom
    from unlearnflow.io import write_jsonl

    files = {}
    for name in ("forget", "retain", *(("holdout",) if holdout else ())):
        rows = [{"question": f"{name} q{i}?", "answer": f"{name} answer {i}."} for i in range(2)]
        files[name] = str(tmp_path / f"{name}.jsonl")
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return custom.load(BenchmarkConfig(name="custom", custom=files))


def test_missing_mia_warning_names_the_holdout_file_on_custom_data(tmp_path):
    """Custom data without a holdout: the one-line warning says that benchmark.custom.holdout would
    enable the attacks. Other layouts without member / non-member splits (TOFU without its holdout,
    WMDP) get the plain line: the custom key means nothing to them."""
    from unlearnflow.data.benchmark import Layout, SplitInfo
    from unlearnflow.metrics.suite import is_custom_layout, missing_mia_warning

    requested = {"privleak", "mia_min_k"}
    custom_layout = _custom_bench(tmp_path).layout
    line = missing_mia_warning(requested, custom_layout)
    assert line.startswith("metrics ['mia_min_k', 'privleak'] need member / non-member splits")
    assert "benchmark.custom.holdout" in line and "never trained on" in line and "\n" not in line
    assert is_custom_layout(_custom_bench(tmp_path / "h", holdout=True).layout)
    tofu_like = Layout(
        info={
            "forget": SplitInfo("qa", "forget"),
            "retain": SplitInfo("qa", "utility"),
            "retain_train": SplitInfo("qa", "train"),
        },
        train={"target": ["forget", "retain_train"], "oracle": ["retain_train"]},
        unlearn={"forget": "forget", "retain": "retain_train"},
        mia=None,
        forget_quality="forget",
    )
    wmdp_like = Layout(
        info={
            "bio": SplitInfo("mcq", "forget"),
            "forget_corpus": SplitInfo("text", "train"),
            "retain_corpus": SplitInfo("text", "train"),
        },
        train={"target": ["forget_corpus", "retain_corpus"], "oracle": ["retain_corpus"]},
        unlearn={"forget": "forget_corpus", "retain": "retain_corpus"},
        mia=None,
        forget_quality=None,
    )
    for other in (tofu_like, wmdp_like):
        assert not is_custom_layout(other)
        assert missing_mia_warning(requested, other) == (
            "metrics ['mia_min_k', 'privleak'] need member / non-member splits, which this benchmark lacks"
        )


def test_evaluate_logs_the_holdout_hint_once_on_custom_data(tmp_path, tiny_model, tiny_tokenizer, caplog):
    """The suite itself logs that line when custom data without a holdout asks for MIA metrics, and
    computes the rest (forget_prob) regardless."""
    import logging

    from unlearnflow.metrics import SuiteOptions, evaluate_splits

    bench = _custom_bench(tmp_path)
    with caplog.at_level(logging.WARNING, logger="unlearnflow.metrics.suite"):
        res = evaluate_splits(
            tiny_model,
            tiny_tokenizer,
            bench.splits,
            bench.layout,
            metrics=["prob", "mia_loss", "privleak"],
            device="cpu",
            opts=SuiteOptions(batch_size=2, max_length=32),
        )
    hints = [r.getMessage() for r in caplog.records if "member / non-member" in r.getMessage()]
    assert len(hints) == 1 and "benchmark.custom.holdout" in hints[0], hints
    assert "forget_prob" in res.aggregates and "mia_loss" not in res.aggregates
