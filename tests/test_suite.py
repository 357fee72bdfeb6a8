"""The metric suite (metrics/suite.py, scored_split.py, split_metrics.py, relative.py) on the tiny
model: which metrics run where, their values against independent references, one scoring pass per
split, and the oracle-relative numbers."""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearnflow.data.benchmark import Layout, SplitInfo
from unlearnflow.data.tokenize import (
    IGNORE_INDEX,
    MCQ_LETTERS,
    encode_example,
    encode_prompt,
    encode_qa,
    format_mcq,
    format_prompt,
)
from unlearnflow.errors import ConfigError, DataError
from unlearnflow.metrics import (
    EvalResult,
    SuiteOptions,
    evaluate_splits,
    mia,
    relative,
    relative_metrics,
    scored_split,
    split_metrics,
    tofu,
)

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
        "forget": SplitInfo("qa", "forget", perturbed=True),
        "retain": SplitInfo("qa", "utility", perturbed=True),
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


def _auc_by_pairs(members, nonmembers) -> float:
    """ROC-AUC by its definition: P(member score > non-member score), ties counting ½."""
    wins = [1.0 if m > n else 0.5 if m == n else 0.0 for m in members for n in nonmembers]
    return sum(wins) / len(wins)


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
    """Per sample: prob = exp(−avgNLL), EM and ES from argmax hits without the final EOS (the
    reference's ES: k capped at |y| − 1), min-k and loss MIA scores from the same log-probs, zlib of
    the decoded scored tokens (" " + answer: leading space kept, EOS dropped); the AUC is recomputed
    from the per-sample scores."""
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
        wrong, n = np.flatnonzero(~content_ok), len(content_ok)
        es = 1 - min((wrong[-1] + 1) if wrong.size else 0, n - 1) / n
        assert rec["extraction_strength"] == pytest.approx(es)
        assert rec["mia_zlib"] == pytest.approx(
            -avg / len(zlib.compress((" " + row["answer"]).encode())), abs=1e-6
        )
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
    real_score, real_generate = scored_split.score_examples, scored_split.generate_greedy

    def score(model, examples, **kw):
        calls["score"] += 1
        calls["rows"].append(len(examples))
        return real_score(model, examples, **kw)

    def generate(*a, **kw):
        calls["generate"] += 1
        return real_generate(*a, **kw)

    monkeypatch.setattr(scored_split, "score_examples", score)
    monkeypatch.setattr(scored_split, "generate_greedy", generate)
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
    auc = _auc_by_pairs(
        [r["mia_min_k"] for r in res.per_sample["privleak_forget"]],
        [r["mia_min_k"] for r in res.per_sample["privleak_holdout"]],
    )
    assert rel["privleak"] == pytest.approx(
        ((1 - auc) - 0.5) / 0.5 * 100, abs=1e-6
    )  # no oracle: AUC'_ref 0.5
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
    """forget_quality: KS of forget truth ratios vs the oracle's; model_utility: 6 / Σ 1/v over the six
    utility aggregates the layout fixes (retain, world_facts × prob, rouge, truth_ratio), listed by
    hand; mia_reference: AUC of avgNLL_oracle − avgNLL_model; privleak from both Min-K% AUCs with an
    oracle whose AUC is 0 (AUC' = 1), so privleak = ((1 − AUC) − 1)/1 × 100 = −100·AUC.
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

    keys = [f"{s}_{m}" for s in ("retain", "world_facts") for m in ("prob", "rouge", "truth_ratio")]
    assert res.utility == keys
    values = [res.aggregates[k] for k in keys]
    expected = 0.0 if min(values) == 0 else len(values) / sum(1 / v for v in values)  # hmean; 0 if any is 0
    assert own["model_utility"] == pytest.approx(expected)
    # oracle Min-K% scores: every forget (member) row below every holdout row → oracle AUC 0
    oracle_min_k = {"forget": -10.0, "holdout": 10.0}
    oracle = {
        split: [
            {
                **r,
                "nll": r["nll"] + 0.1 * i,
                "truth_ratio": 1.0 + i,
                "mia_min_k": oracle_min_k.get(split, 0.0) + i,
            }
            for i, r in enumerate(rows)
        ]
        for split, rows in res.per_sample.items()
    }
    rel = relative_metrics(res, layout, oracle, ALL)
    model_tr = [r["truth_ratio"] for r in res.per_sample["forget"]]
    assert rel["forget_quality"] == pytest.approx(stats.ks_2samp(model_tr, [1.0, 2.0, 3.0]).pvalue)
    ref = [
        [
            o["nll"] - r["nll"] for r, o in zip(res.per_sample[s], oracle[s], strict=True)
        ]  # nll_oracle − nll_model
        for s in ("forget", "holdout")
    ]
    assert rel["mia_reference"] == pytest.approx(_auc_by_pairs(*ref))
    assert res.per_sample["forget"][0]["mia_reference"] == pytest.approx(ref[0][0])
    auc = _auc_by_pairs(
        [r["mia_min_k"] for r in res.per_sample["forget"]],
        [r["mia_min_k"] for r in res.per_sample["holdout"]],
    )
    assert rel["privleak"] == pytest.approx(-100 * auc, abs=1e-6)
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


def test_excluded_rows_are_never_scored_and_the_rest_score_as_alone(tiny_model, tiny_tokenizer):
    """A relearning attack's pool (``SuiteOptions.exclude``) leaves the split: its rows have no
    per-sample output, the others keep their indices, and the aggregate equals evaluating the kept
    rows alone; other splits are untouched; excluding every row is a one-line error."""
    forget = _qa_rows(6)
    splits = {
        "forget": forget,
        "retain": _qa_rows(2),
        "world_facts": _options_rows(2),
        "holdout": _qa_rows(2),
    }
    layout = _tofu_layout()
    opts = SuiteOptions(**{**OPTS.__dict__, "exclude": {"forget": frozenset({0, 3, 4})}})
    res = evaluate_splits(
        tiny_model, tiny_tokenizer, splits, layout, metrics=["prob"], device="cpu", opts=opts
    )
    assert [r["index"] for r in res.per_sample["forget"]] == [1, 2, 5]
    alone = evaluate_splits(
        tiny_model, tiny_tokenizer, {**splits, "forget": [forget[i] for i in (1, 2, 5)]}, layout,
        metrics=["prob"], device="cpu", opts=OPTS,
    )  # fmt: skip
    assert res.aggregates["forget_prob"] == pytest.approx(alone.aggregates["forget_prob"], rel=1e-6)
    assert res.aggregates["retain_prob"] == alone.aggregates["retain_prob"]
    everything = SuiteOptions(**{**OPTS.__dict__, "exclude": {"forget": frozenset(range(6))}})
    with pytest.raises(DataError, match="split 'forget': every row is excluded"):
        evaluate_splits(
            tiny_model, tiny_tokenizer, splits, layout, metrics=["prob"], device="cpu", opts=everything
        )


def test_grad_norm_matches_an_independent_per_sample_backward(sharp_model, tiny_tokenizer):
    """Each row's mia_grad_norm = −mean over parameter tensors of ‖∇ mean NLL(answer tokens, final EOS
    out)‖₂, recomputed here one unpadded row at a time with .backward(); the AUC is the fraction of
    (forget, holdout) pairs the forget row wins (ties ½)."""
    tok = tiny_tokenizer
    splits = _tofu_splits()
    res = evaluate_splits(
        sharp_model, tok, splits, _tofu_layout(), metrics=["mia_grad_norm"], device="cpu", opts=OPTS
    )
    for split in ("forget", "holdout"):
        for rec, row in zip(res.per_sample[split], splits[split], strict=True):
            ex = encode_qa(tok, row["question"], row["answer"], max_length=MAX_LENGTH)
            sharp_model.zero_grad()
            logits = sharp_model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            pos = [t for t, label in enumerate(ex["labels"]) if t and label != IGNORE_INDEX][:-1]
            loss = torch.stack(
                [F.cross_entropy(logits[t - 1], torch.tensor(ex["labels"][t])) for t in pos]
            ).mean()
            loss.backward()
            norms = [q.grad.norm() for q in sharp_model.parameters() if q.grad is not None]
            assert rec["mia_grad_norm"] == pytest.approx(-float(torch.stack(norms).mean()), rel=1e-4)
    sharp_model.zero_grad()
    auc = _auc_by_pairs(
        [r["mia_grad_norm"] for r in res.per_sample["forget"]],
        [r["mia_grad_norm"] for r in res.per_sample["holdout"]],
    )
    assert res.aggregates["mia_grad_norm"] == pytest.approx(auc)


# --- metric definitions: reference | unlearnflow --------------------------------------------------


def test_definitions_reach_the_maths(sharp_model, tiny_tokenizer):
    """``definitions="unlearnflow"``: ES = 0 when the last content token is wrong (the reference:
    1/|y|), zlib of the raw answer (the reference: " " + answer); truth ratios and normalised
    probabilities differ by the guard's relative size 1e-10 / P: per row tr_ref = tr_ours · P_c / (P_c +
    1e-10) with P_c = exp(−avgNLL(paraphrase)), checked to 1e-9; this untrained model's P ≳ 1e-5 bounds
    the aggregates' difference by 1e-5 (~1e-10 for a trained model, P ~ 0.5)."""
    tok, splits, layout = tiny_tokenizer, _tofu_splits(), _tofu_layout()
    metrics = ["prob", "truth_ratio", "extraction_strength", "mia_zlib"]

    def run(definitions: str):
        opts = SuiteOptions(**{**OPTS.__dict__, "definitions": definitions})
        return evaluate_splits(sharp_model, tok, splits, layout, metrics=metrics, device="cpu", opts=opts)

    ref, ours = run("reference"), run("unlearnflow")
    last_wrong = 0
    for r_rec, o_rec, row in zip(
        ref.per_sample["forget"], ours.per_sample["forget"], splits["forget"], strict=True
    ):
        _, ok, avg = _stats(
            sharp_model, tok, encode_qa(tok, row["question"], row["answer"], max_length=MAX_LENGTH)
        )
        ok = ok[:-1]  # final EOS out
        n, wrong = len(ok), np.flatnonzero(~ok)
        k = (wrong[-1] + 1) if wrong.size else 0
        assert o_rec["extraction_strength"] == pytest.approx(1 - k / n)
        assert r_rec["extraction_strength"] == pytest.approx(1 - min(k, n - 1) / n)
        last_wrong += int(not ok[-1])
        assert o_rec["mia_zlib"] == pytest.approx(-avg / len(zlib.compress(row["answer"].encode())), abs=1e-6)
        assert r_rec["mia_zlib"] == pytest.approx(
            -avg / len(zlib.compress((" " + row["answer"]).encode())), abs=1e-6
        )
        p_c = math.exp(
            -_stats(
                sharp_model,
                tok,
                encode_qa(tok, row["question"], row["paraphrased_answer"], max_length=MAX_LENGTH),
            )[2]
        )
        assert r_rec["truth_ratio"] == pytest.approx(o_rec["truth_ratio"] * p_c / (p_c + 1e-10), rel=1e-9)
    assert last_wrong > 0  # the case where the definitions differ does occur in this fixture
    for key in ("forget_truth_ratio", "retain_truth_ratio", "world_facts_prob", "world_facts_truth_ratio"):
        assert ours.aggregates[key] == pytest.approx(ref.aggregates[key], rel=1e-5)


def test_zlib_text_is_the_scored_text_when_the_target_is_cut(tiny_tokenizer):
    """A target cut by max_length is compressed as cut (reference): the kept answer tokens decoded,
    leading space kept, no EOS; unlearnflow compresses the full raw answer."""
    tok = tiny_tokenizer
    row = _qa_rows(1)[0]
    prompt_len = len(encode_prompt(tok, row["question"]))
    answer_ids = tok(" " + row["answer"], add_special_tokens=False)["input_ids"]
    assert len(answer_ids) > 3
    ex = encode_qa(tok, row["question"], row["answer"], max_length=prompt_len + 3)
    s = scored_split.ScoredSplit(
        "forget", "qa", "forget", [row], np.arange(1), target_examples=[ex], target_texts=[row["answer"]]
    )
    (text,) = split_metrics.zlib_texts(s, tok)
    assert text == tok.decode(answer_ids[:3])
    assert (" " + row["answer"]).startswith(text) and text.startswith(" ") and len(text) < len(row["answer"])
    s.definitions = "unlearnflow"
    assert split_metrics.zlib_texts(s, tok) == [row["answer"]]


def test_evaluate_config_carries_definitions():
    from unlearnflow.config import EvaluateConfig, parse_section

    assert EvaluateConfig().definitions == "reference"
    opts = SuiteOptions(**EvaluateConfig(definitions="unlearnflow").suite_options(MAX_LENGTH))
    assert opts.definitions == "unlearnflow"
    with pytest.raises(ConfigError, match="definitions"):
        parse_section({"definitions": "tofu"}, "evaluate", EvaluateConfig)


# --- forget_quality never disappears quietly --------------------------------------------------------


def _fq_result() -> tuple[EvalResult, Layout]:
    """A hand-made result on a layout with a forget-quality split, MIA splits and no utility split."""
    layout = Layout(
        info={"forget": SplitInfo("qa", "forget", perturbed=True), "holdout": SplitInfo("qa", "mia")},
        train={"target": ["forget"], "oracle": ["holdout"]},
        unlearn={"forget": "forget", "retain": "holdout"},
        mia=("forget", "holdout"),
        forget_quality="forget",
    )
    rows = {
        "forget": [
            {"index": i, "truth_ratio": tr, "mia_min_k": m}
            for i, (tr, m) in enumerate([(0.5, 3.0), (2.0, 2.0)])
        ],
        "holdout": [{"index": i, "mia_min_k": m} for i, m in enumerate([1.0, 2.0])],
    }
    return EvalResult(aggregates={}, per_sample=rows, utility=layout.utility_components()), layout


def test_oracle_without_truth_ratios_is_an_error_naming_split_and_file():
    res, layout = _fq_result()
    oracle = {
        n: [{k: v for k, v in r.items() if k != "truth_ratio"} for r in rows]
        for n, rows in res.per_sample.items()
    }
    with pytest.raises(
        DataError, match=r"split 'forget' \(eval/oracle/samples/forget\.jsonl\) lack truth_ratio"
    ):
        relative_metrics(res, layout, oracle, ["truth_ratio"], oracle_dir="eval/oracle/samples")
    with pytest.raises(DataError, match=r"'forget'.*forget\.jsonl"):
        relative_metrics(
            res, layout, {"holdout": oracle["holdout"]}, ["truth_ratio"]
        )  # no forget file at all


def test_forget_quality_without_truth_ratio_metric_warns_and_is_absent(caplog):
    res, layout = _fq_result()
    with caplog.at_level(logging.WARNING, logger="unlearnflow.metrics.relative"):
        out = relative_metrics(res, layout, res.per_sample, ["prob"])
    assert math.isnan(out["forget_quality"])
    assert "forget_quality is NOT computed" in caplog.text and "'forget'" in caplog.text
    assert "truth_ratio" in caplog.text


def test_forget_quality_hand_ks_value():
    """Model tr [0.5, 2] vs oracle tr [3, 4]: fully separated samples of sizes 2 and 2 → D = 1,
    reached by 2 of the C(4,2) = 6 orderings → exact p = 1/3. No warning when truth_ratio is asked for."""
    res, layout = _fq_result()
    oracle = {"forget": [{"index": 0, "truth_ratio": 3.0}, {"index": 1, "truth_ratio": 4.0}]}
    assert relative_metrics(res, layout, oracle, ["truth_ratio"])["forget_quality"] == pytest.approx(1 / 3)


# --- privleak on hand-made scores ----------------------------------------------------------------


def test_privleak_from_hand_made_scores():
    """Model Min-K% members [3, 2] vs non-members [1, 2]: 3 wins + 1 tie of 4 pairs → AUC 0.875,
    AUC' = 0.125. Without oracle: (0.125 − 0.5)/0.5 × 100 = −75. Oracle members [1, 2] vs
    non-members [3, 2]: 1 tie of 4 → AUC 0.125, AUC' = 0.875: (0.125 − 0.875)/0.875 × 100 = −600/7."""
    res, layout = _fq_result()
    assert relative_metrics(res, layout, None, ["privleak"])["privleak"] == pytest.approx(-75.0)
    oracle = {
        "forget": [{"index": 0, "mia_min_k": 1.0}, {"index": 1, "mia_min_k": 2.0}],
        "holdout": [{"index": 0, "mia_min_k": 3.0}, {"index": 1, "mia_min_k": 2.0}],
    }
    assert relative_metrics(res, layout, oracle, ["privleak"])["privleak"] == pytest.approx(-600 / 7)


# --- model_utility: components fixed by the benchmark ----------------------------------------------


def _all_kinds_layout(perturbed_retain: bool) -> Layout:
    return Layout(
        info={
            "forget": SplitInfo("qa", "forget", perturbed=True),
            "retain": SplitInfo("qa", "utility", perturbed=perturbed_retain),
            "world_facts": SplitInfo("options", "utility"),
            "knowmem_retain": SplitInfo("knowmem", "utility"),
            "verbmem_forget": SplitInfo("completion", "forget"),
            "raw_retain": SplitInfo("text", "utility"),
            "mmlu": SplitInfo("mcq", "utility"),
            "wmdp_bio": SplitInfo("mcq", "forget"),
            "holdout": SplitInfo("qa", "mia"),
        },
        train={"target": ["forget"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=None,
        forget_quality="forget",
    )


def test_utility_components_are_fixed_by_the_layout():
    """Only utility splits count, each with its kind's metrics; a qa split's truth ratio only when its
    rows carry paraphrased and perturbed answers."""
    assert _all_kinds_layout(True).utility_components() == [
        "retain_prob", "retain_rouge", "retain_truth_ratio",
        "world_facts_prob", "world_facts_rouge", "world_facts_truth_ratio",
        "knowmem_retain_knowmem", "raw_retain_prob", "mmlu_mcq_accuracy",
    ]  # fmt: skip
    assert _all_kinds_layout(False).utility_components()[:2] == ["retain_prob", "retain_rouge"]
    assert "retain_truth_ratio" not in _all_kinds_layout(False).utility_components()


@pytest.mark.parametrize(
    ("kind", "row"),
    [
        ("qa", _qa_rows(1)[0]),
        ("qa", {"question": "q", "answer": "a"}),
        ("options", _options_rows(1)[0]),
        ("knowmem", {"question": "q", "answer": "a"}),
        ("completion", {"prompt": "p", "gt": "g"}),
        ("text", {"text": "t"}),
        ("mcq", {"question": "q", "choices": ["a", "b"], "answer": 0}),
    ],
)
def test_utility_table_agrees_with_the_registered_metrics(kind, row):
    """The layout's table (data/benchmark.py) names exactly the registered metrics that run on a
    utility split of that kind, so model_utility's components are what the suite computes."""
    perturbed = kind == "qa" and {"paraphrased_answer", "perturbed_answer"} <= row.keys()
    layout = Layout({"s": SplitInfo(kind, "utility", perturbed=perturbed)}, {}, {}, None, None)
    registered = {
        m for m in split_metrics.METRICS if split_metrics.METRICS.get(m).applies(kind, "utility", [row])
    }
    assert {k.removeprefix("s_") for k in layout.utility_components()} == registered


def test_benchmark_layout_reads_the_perturbed_flag_off_the_rows():
    from unlearnflow.data.benchmark import Benchmark

    bench = Benchmark(
        splits={"forget": _qa_rows(2), "retain": [{"question": "q", "answer": "a"}], "wf": _options_rows(1)},
        info={
            "forget": SplitInfo("qa", "forget"),
            "retain": SplitInfo("qa", "utility"),
            "wf": SplitInfo("options", "utility"),
        },
        train={"target": ["forget", "retain"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        forget_quality="forget",
    )
    layout = Layout.from_manifest(bench.to_manifest())
    assert layout.info["forget"].perturbed and not layout.info["retain"].perturbed
    assert layout.utility_components() == [
        "retain_prob",
        "retain_rouge",
        "wf_prob",
        "wf_rouge",
        "wf_truth_ratio",
    ]


def test_model_utility_is_the_hand_hmean_of_the_benchmark_components():
    """The TOFU-like layout's six components (retain, world_facts × prob, rouge, truth_ratio) set by hand
    to [1/2, 1/4, 1/4, 1, 1/2, 1/4]: hmean = 6 / (2 + 4 + 4 + 1 + 2 + 4) = 6/17. forget_prob (0.001)
    is not a component and must not enter (it would give 7/1017)."""
    layout = _tofu_layout()
    values = {
        "retain_prob": 0.5, "retain_rouge": 0.25, "retain_truth_ratio": 0.25,
        "world_facts_prob": 1.0, "world_facts_rouge": 0.5, "world_facts_truth_ratio": 0.25,
    }  # fmt: skip
    res = EvalResult(
        aggregates={**values, "forget_prob": 0.001}, per_sample={}, utility=layout.utility_components()
    )
    assert relative_metrics(res, layout, None, ["prob", "rouge"])["model_utility"] == pytest.approx(6 / 17)


def test_a_missing_model_utility_component_is_an_error_naming_it():
    """evaluate.metrics without rouge on TOFU: check_metrics (before any model loads) and
    relative_metrics both refuse, naming the components and the metric to add; a NaN component too."""
    layout = replace(_tofu_layout(), forget_quality=None)
    with pytest.raises(
        ConfigError, match=r"model_utility needs retain_rouge, world_facts_rouge .* lacks rouge"
    ):
        relative.check_metrics(layout, ["prob", "truth_ratio", "mia_loss"])
    relative.check_metrics(layout, ["prob", "rouge", "truth_ratio"])  # complete: no error
    with pytest.raises(ConfigError, match="unknown metric"):
        relative.check_metrics(layout, ["prob", "rouge", "truth_ratio", "utility"])
    parts = {
        "retain_prob": 0.5,
        "retain_truth_ratio": 0.5,
        "world_facts_prob": 0.5,
        "world_facts_truth_ratio": 0.5,
    }
    res = EvalResult(aggregates=parts, per_sample={}, utility=layout.utility_components())
    with pytest.raises(ConfigError, match="retain_rouge, world_facts_rouge"):
        relative_metrics(res, layout, None, ["prob", "truth_ratio"])
    res.aggregates.update(retain_rouge=math.nan, world_facts_rouge=0.5)
    with pytest.raises(DataError, match="retain_rouge is NaN"):
        relative_metrics(res, layout, None, ["prob", "rouge", "truth_ratio"])


def test_forget_quality_split_without_truth_ratio_inputs_is_an_error():
    layout = _all_kinds_layout(True)
    bad = Layout(
        {**layout.info, "forget": SplitInfo("qa", "forget")}, layout.train, layout.unlearn, None, "forget"
    )
    metrics = ["prob", "rouge", "truth_ratio", "knowmem", "mcq_accuracy"]
    relative.check_metrics(layout, metrics)
    with pytest.raises(DataError, match="'forget' is the benchmark's forget-quality split"):
        relative.check_metrics(bad, metrics)


def test_layout_perturbed_flag_must_match_the_rows(tiny_model, tiny_tokenizer):
    """A stale layout (perturbed=False on rows that carry perturbed answers) would drop the truth ratio
    from model_utility silently: it is an error before any scoring."""
    layout = _tofu_layout()
    stale = Layout(
        {**layout.info, "retain": SplitInfo("qa", "utility")},
        layout.train,
        layout.unlearn,
        layout.mia,
        "forget",
    )
    with pytest.raises(DataError, match=r"split 'retain': the rows carry .* perturbed=False"):
        evaluate_splits(
            tiny_model, tiny_tokenizer, _tofu_splits(), stale, metrics=["prob"], device="cpu", opts=OPTS
        )
