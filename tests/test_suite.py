"""The metric suite (metrics/suite.py) on the tiny model: which metrics run where, their values
against independent references, one scoring pass per split, and the oracle-relative numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unlearnflow.data.benchmark import Layout, SplitInfo
from unlearnflow.data.tokenize import (
    IGNORE_INDEX,
    MCQ_LETTERS,
    encode_example,
    encode_qa,
    format_mcq,
    format_prompt,
)
from unlearnflow.errors import ConfigError
from unlearnflow.metrics import SuiteOptions, evaluate_splits, mia, relative_metrics, suite, tofu

MAX_LENGTH = 96
OPTS = SuiteOptions(
    batch_size=4, max_length=MAX_LENGTH, max_new_tokens=4, knowmem_max_new_tokens=4, verbmem_max_new_tokens=4
)
QUESTIONS = [
    "Where was Alda Voss born?",
    "Who wrote The Glass Orchard?",
    "What is the capital of Ostrava Minor?",
    "In which year was Cira Maelor born?",
]
ALL = [
    "prob",
    "rouge",
    "truth_ratio",
    "exact_memorization",
    "extraction_strength",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_pp",
    "mia_reference",
    "privleak",
]


def _qa_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "question": QUESTIONS[i % 4] + " " * (i + offset),
            "answer": f"Answer number {i + offset} is Kerravin.",
            "paraphrased_answer": f"It is Kerravin, number {i}.",
            "perturbed_answer": [f"Delmsford {i}.", "Ivo Stenmark.", "In 1957."],
            "author": f"Author {i}",
            "attribute": "birthplace",
        }
        for i in range(n)
    ]


def _options_rows(n: int) -> list[dict]:
    return [
        {"question": QUESTIONS[i % 4], "answer": f"Delmsford {i}", "perturbed_answer": ["Kerravin", "Voss"]}
        for i in range(n)
    ]


def _tofu_layout(with_holdout: bool = True) -> Layout:
    info = {
        "forget": SplitInfo("qa", "forget"),
        "retain": SplitInfo("qa", "utility"),
        "world_facts": SplitInfo("options", "utility"),
        "train_only": SplitInfo("qa", "train"),
    }
    if with_holdout:
        info["holdout"] = SplitInfo("qa", "mia")
    return Layout(
        info=info,
        train={"target": ["forget", "retain"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=("forget", "holdout") if with_holdout else None,
        forget_quality="forget",
    )


def _tofu_splits() -> dict[str, list[dict]]:
    return {
        "forget": _qa_rows(3),
        "retain": _qa_rows(4),
        "world_facts": _options_rows(3),
        "holdout": _qa_rows(3, offset=5),
        "train_only": [],  # never read: role train
    }


def _stats(model, tok, example: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """Independent per-token log p and argmax hits of one unpadded example, and its avgNLL."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    lp, ok = [], []
    for t, label in enumerate(example["labels"]):
        if t and label != IGNORE_INDEX:
            dist = torch.log_softmax(logits[t - 1].double(), -1)
            lp.append(float(dist[label]))
            ok.append(int(dist.argmax()) == label)
    return np.array(lp), np.array(ok), -float(np.mean(lp))


def test_tofu_layout_keys_per_kind_and_role(sharp_model, tiny_tokenizer):
    """Forget gets the memorisation metrics, utility splits only prob/rouge/truth_ratio, the mia-only
    holdout no split metric; MIA AUCs are reported; train splits are not evaluated."""
    res = evaluate_splits(
        sharp_model, tiny_tokenizer, _tofu_splits(), _tofu_layout(), metrics=ALL, device="cpu", opts=OPTS
    )
    tofu_keys = ("prob", "rouge", "truth_ratio")
    expected = (
        {f"forget_{m}" for m in (*tofu_keys, "exact_memorization", "extraction_strength")}
        | {f"retain_{m}" for m in tofu_keys}
        | {f"world_facts_{m}" for m in tofu_keys}
        | {"mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp"}
    )
    assert set(res.aggregates) == expected
    assert sorted(res.utility) == sorted(k for k in expected if k.startswith(("retain", "world_facts")))
    assert set(res.per_sample) == {"forget", "retain", "world_facts", "holdout"}
    assert set(res.per_sample["holdout"][0]) == {
        "index", "question", "answer", "nll", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp", "author", "attribute"
    }  # fmt: skip
    assert all(
        0.0 <= res.aggregates[k] <= 1.0 for k in ("mia_loss", "mia_min_k", "forget_extraction_strength")
    )


def test_token_level_values_match_independent_references(sharp_model, tiny_tokenizer):
    """Per sample: prob = exp(−avgNLL), EM and ES from argmax hits without the final EOS, min-k and
    loss MIA scores from the same log-probs; the AUC is recomputed from the per-sample scores."""
    tok = tiny_tokenizer
    splits = _tofu_splits()
    res = evaluate_splits(sharp_model, tok, splits, _tofu_layout(), metrics=ALL, device="cpu", opts=OPTS)
    for rec, row in zip(res.per_sample["forget"], splits["forget"], strict=True):
        lp, ok, avg = _stats(
            sharp_model, tok, encode_qa(tok, row["question"], row["answer"], max_length=MAX_LENGTH)
        )
        content_lp, content_ok = lp[:-1], ok[:-1]  # the appended EOS is the last target token
        assert rec["nll"] == pytest.approx(avg, abs=1e-5)
        assert rec["prob"] == pytest.approx(math.exp(-avg), rel=1e-4)
        assert rec["exact_memorization"] == pytest.approx(content_ok.mean())
        wrong = np.flatnonzero(~content_ok)
        es = 1 - ((wrong[-1] + 1) if wrong.size else 0) / len(content_ok)
        assert rec["extraction_strength"] == pytest.approx(es)
        k = max(1, int(len(content_lp) * 0.4))
        assert rec["mia_min_k"] == pytest.approx(np.sort(content_lp)[:k].mean(), abs=1e-5)
        assert rec["mia_loss"] == pytest.approx(-avg, abs=1e-5)
    members = [r["mia_min_k"] for r in res.per_sample["forget"]]
    non = [r["mia_min_k"] for r in res.per_sample["holdout"]]
    assert res.aggregates["mia_min_k"] == pytest.approx(mia.auc(np.array(members), np.array(non)))


def test_one_scoring_pass_per_split_and_generation_only_when_needed(monkeypatch, tiny_model, tiny_tokenizer):
    """prob + truth_ratio + MIA: one score_examples call per evaluated split (answer, paraphrase and
    perturbed answers batched together), no generation; the model's training mode is restored."""
    calls = {"score": 0, "generate": 0, "rows": []}
    real_score, real_generate = suite.score_examples, suite.generate_greedy

    def score(model, examples, **kw):
        calls["score"] += 1
        calls["rows"].append(len(examples))
        return real_score(model, examples, **kw)

    def generate(*a, **kw):
        calls["generate"] += 1
        return real_generate(*a, **kw)

    monkeypatch.setattr(suite, "score_examples", score)
    monkeypatch.setattr(suite, "generate_greedy", generate)
    tiny_model.train()
    evaluate_splits(
        tiny_model,
        tiny_tokenizer,
        _tofu_splits(),
        _tofu_layout(),
        metrics=["prob", "truth_ratio", "mia_loss"],
        device="cpu",
        opts=OPTS,
    )
    # forget 3 × (answer + paraphrase + 3 perturbed), retain 4 × 5, world_facts 3 × (answer + 2), holdout 3
    assert calls["score"] == 4 and calls["generate"] == 0
    assert calls["rows"] == [15, 20, 9, 3]
    assert tiny_model.training


def test_muse_kinds_knowmem_verbmem_and_text_mia(sharp_model, tiny_tokenizer):
    """knowmem and verbmem are ROUGE-L F1 of generations (knowmem prompts carry their few-shot
    context); text splits give MIA scores over the whole text; privleak needs no utility split."""
    layout = Layout(
        info={
            "verbmem_forget": SplitInfo("completion", "forget"),
            "knowmem_forget": SplitInfo("knowmem", "forget"),
            "knowmem_retain": SplitInfo("knowmem", "utility"),
            "privleak_forget": SplitInfo("text", "mia"),
            "privleak_holdout": SplitInfo("text", "mia"),
        },
        train={"target": ["privleak_forget"], "oracle": ["privleak_holdout"]},
        unlearn={"forget": "privleak_forget", "retain": "privleak_holdout"},
        mia=("privleak_forget", "privleak_holdout"),
        forget_quality=None,
    )
    context = "Question: Who wrote The Glass Orchard?\nAnswer: Ivo Stenmark.\n\n"
    splits = {
        "verbmem_forget": [{"prompt": "Alda Voss was born", "gt": " in Kerravin."}] * 2,
        "knowmem_forget": [{"question": QUESTIONS[0], "answer": "Kerravin", "context": context}],
        "knowmem_retain": [{"question": QUESTIONS[2], "answer": "Delmsford"}],
        "privleak_forget": [
            {"text": t} for t in ("Alda Voss was born in Kerravin.", "The capital is Delmsford.")
        ],
        "privleak_holdout": [{"text": t} for t in ("Brom Tellan writes mysteries.", "Cira Maelor, 1957.")],
    }
    res = evaluate_splits(
        sharp_model,
        tiny_tokenizer,
        splits,
        layout,
        metrics=["knowmem", "verbmem", "mia_min_k", "privleak", "prob"],
        device="cpu",
        opts=OPTS,
    )
    assert set(res.aggregates) == {
        "verbmem_forget_verbmem",
        "knowmem_forget_knowmem",
        "knowmem_retain_knowmem",
        "mia_min_k",
    }
    assert res.utility == ["knowmem_retain_knowmem"]
    rec = res.per_sample["verbmem_forget"][0]
    assert rec["verbmem"] == pytest.approx(tofu.rouge_l_f1([rec["generation"]], [" in Kerravin."])[0])
    text = splits["privleak_forget"][0]["text"]
    lp, _, _ = _stats(
        sharp_model, tiny_tokenizer, encode_example(tiny_tokenizer, "", text, max_length=MAX_LENGTH)
    )
    k = max(1, int((len(lp) - 1) * 0.4))
    assert res.per_sample["privleak_forget"][0]["mia_min_k"] == pytest.approx(
        np.sort(lp[:-1])[:k].mean(), abs=1e-5
    )
    rel = relative_metrics(res, layout, None, ["privleak"])
    assert rel["privleak"] == pytest.approx(mia.privleak(res.aggregates["mia_min_k"], None))
    assert math.isnan(rel["forget_quality"])


def test_mcq_accuracy_picks_the_most_likely_letter(sharp_model, tiny_tokenizer):
    """Accuracy = mean(argmax_c log p(" <letter c>" | lettered prompt) == answer), checked against
    log-likelihoods computed one option at a time; the text format scores each choice's text."""
    tok = tiny_tokenizer
    rows = [
        {"question": QUESTIONS[i], "choices": ["Kerravin", "Delmsford", "Voss", "1957"], "answer": i % 4}
        for i in range(4)
    ]
    layout = Layout(
        info={"bio": SplitInfo("mcq", "forget"), "mmlu": SplitInfo("mcq", "utility")},
        train={"target": ["bio"], "oracle": ["mmlu"]},
        unlearn={"forget": "bio", "retain": "mmlu"},
        mia=None,
        forget_quality=None,
    )

    def run(mcq_format: str):
        opts = SuiteOptions(**{**OPTS.__dict__, "mcq_format": mcq_format})
        splits = {"bio": rows, "mmlu": rows}
        return evaluate_splits(
            sharp_model, tok, splits, layout, metrics=["mcq_accuracy"], device="cpu", opts=opts
        )

    def expected_hits(mcq_format: str) -> list[float]:
        """Option log-likelihoods one at a time: the letters after the lettered prompt, or each
        choice's text after the plain question prompt."""
        hits = []
        for row in rows:
            if mcq_format == "letter":
                prompt = format_mcq(row["question"], row["choices"])
                targets = [" " + MCQ_LETTERS[c] for c in range(4)]
            else:
                prompt, targets = format_prompt(row["question"]), [" " + c for c in row["choices"]]
            lls = [
                _stats(
                    sharp_model, tok, encode_example(tok, prompt, t, max_length=MAX_LENGTH, add_eos=False)
                )[0].sum()
                for t in targets
            ]
            hits.append(float(np.argmax(lls) == row["answer"]))
        return hits

    res = run("letter")
    expected = expected_hits("letter")
    assert [r["mcq_accuracy"] for r in res.per_sample["bio"]] == expected
    assert res.aggregates["bio_mcq_accuracy"] == pytest.approx(np.mean(expected))
    assert res.utility == ["mmlu_mcq_accuracy"]
    res_text = run("text")
    assert 0.0 <= res_text.aggregates["bio_mcq_accuracy"] <= 1.0
    assert [r["mcq_accuracy"] for r in res_text.per_sample["bio"]] == expected_hits("text")


def test_relative_metrics_against_oracle_rows_and_self(sharp_model, tiny_tokenizer):
    """forget_quality: KS of forget truth ratios vs the oracle's; model_utility: hmean of the utility
    aggregates; mia_reference: AUC of avgNLL_oracle − avgNLL_model; privleak from both Min-K% AUCs.
    Against itself: forget_quality 1, reference AUC 0.5, privleak 0."""
    layout = _tofu_layout()
    res = evaluate_splits(
        sharp_model, tiny_tokenizer, _tofu_splits(), layout, metrics=ALL, device="cpu", opts=OPTS
    )
    own = relative_metrics(res, layout, res.per_sample, ALL)
    assert own["forget_quality"] == pytest.approx(1.0)
    assert own["mia_reference"] == pytest.approx(0.5)
    assert own["privleak"] == pytest.approx(0.0, abs=1e-6)
    from scipy import stats

    parts = [res.aggregates[k] for k in res.utility]
    assert own["model_utility"] == pytest.approx(stats.hmean(parts))
    oracle = {
        split: [
            {**r, "nll": r["nll"] + 0.1 * i, "truth_ratio": 1.0 + i, "mia_min_k": -float(i)}
            for i, r in enumerate(rows)
        ]
        for split, rows in res.per_sample.items()
    }
    rel = relative_metrics(res, layout, oracle, ALL)
    model_tr = [r["truth_ratio"] for r in res.per_sample["forget"]]
    assert rel["forget_quality"] == pytest.approx(stats.ks_2samp(model_tr, [1.0, 2.0, 3.0]).pvalue)
    ref = [
        mia.reference_score(
            np.array([r["nll"] for r in res.per_sample[s]]), np.array([o["nll"] for o in oracle[s]])
        )
        for s in ("forget", "holdout")
    ]
    assert rel["mia_reference"] == pytest.approx(mia.auc(*ref))
    assert res.per_sample["forget"][0]["mia_reference"] == pytest.approx(ref[0][0])
    assert rel["privleak"] == pytest.approx(
        mia.privleak(res.aggregates["mia_min_k"], 0.5)
    )  # oracle scores tie
    assert math.isnan(relative_metrics(res, layout, None, ALL)["mia_reference"])


def test_max_samples_is_a_deterministic_subset_and_unknown_metrics_fail(tiny_model, tiny_tokenizer):
    splits = {
        "forget": _qa_rows(6),
        "retain": _qa_rows(2),
        "world_facts": _options_rows(2),
        "holdout": _qa_rows(2),
    }
    layout = _tofu_layout()
    opts = SuiteOptions(**{**OPTS.__dict__, "max_samples": 3, "seed": 7})
    a = evaluate_splits(tiny_model, tiny_tokenizer, splits, layout, metrics=["prob"], device="cpu", opts=opts)
    b = evaluate_splits(tiny_model, tiny_tokenizer, splits, layout, metrics=["prob"], device="cpu", opts=opts)
    idx = [r["index"] for r in a.per_sample["forget"]]
    assert len(idx) == 3 and idx == sorted(idx) and idx == [r["index"] for r in b.per_sample["forget"]]
    assert "holdout" not in a.per_sample  # no MIA requested: the mia-only split is not scored
    with pytest.raises(ConfigError, match=r"unknown metric 'mia'; known: .*mia_min_k_pp"):
        evaluate_splits(tiny_model, tiny_tokenizer, splits, layout, metrics=["mia"], device="cpu", opts=opts)


def test_grad_norm_runs_on_member_and_nonmember_splits(sharp_model, tiny_tokenizer):
    res = evaluate_splits(
        sharp_model,
        tiny_tokenizer,
        _tofu_splits(),
        _tofu_layout(),
        metrics=["mia_grad_norm"],
        device="cpu",
        opts=OPTS,
    )
    assert 0.0 <= res.aggregates["mia_grad_norm"] <= 1.0
    assert all(r["mia_grad_norm"] < 0 for r in res.per_sample["holdout"])
