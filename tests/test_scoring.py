"""Batched scoring and generation (metrics/scoring.py) and the metric suite (metrics/suite.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearnflow.data.tokenize import IGNORE_INDEX, collate, encode_prompt, encode_qa
from unlearnflow.errors import ConfigError
from unlearnflow.metrics import METRICS, evaluate_splits, suite
from unlearnflow.metrics.scoring import answer_nll, generate_greedy, score_qa

MAX_LENGTH = 96

QUESTIONS = [
    "Where was Alda Voss born?",
    "Who wrote The Glass Orchard?",
    "What is the capital of Ostrava Minor?",
    "In which year was Cira Maelor born?",
]


@pytest.fixture
def sharp_model(tiny_model):
    """The tiny Llama with weights redrawn at std 0.3 (norms kept at 1): the default 0.02 init gives
    near-uniform logits and the same greedy token for every prompt, which would hide ordering bugs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tiny_model.eval()


def _hf_avg_nll(model, tokenizer, question: str, answer: str) -> float:
    """Independent avgNLL: the model's own shifted mean cross-entropy on one unpadded pair."""
    batch = collate([encode_qa(tokenizer, question, answer, max_length=MAX_LENGTH)], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def _naive_greedy(model, tokenizer, question: str, max_new_tokens: int, eos: int) -> list[int]:
    """Reference decoding: one unpadded row, full forward each step, argmax, stop at ``eos``."""
    ids = torch.tensor([encode_prompt(tokenizer, question)])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


# --- answer_nll ---------------------------------------------------------------------------------


def test_answer_nll_matches_plain_cross_entropy():
    """Row 0: prompt (2 tokens) + 3 answer tokens + 1 padding; row 1: no padding; row 2 all masked.
    Reference: Σ_t CE(logits[b, t−1], labels[b, t]) over unmasked t ≥ 1, one position at a time."""
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2] = IGNORE_INDEX
    labels[0, 5] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    nll_sum, count = answer_nll(logits, labels)
    expected_sum = torch.zeros(3)
    expected_count = torch.zeros(3, dtype=torch.long)
    for b in range(3):
        for t in range(1, 6):
            if labels[b, t] != IGNORE_INDEX:
                expected_sum[b] += F.cross_entropy(logits[b, t - 1], labels[b, t])
                expected_count[b] += 1
    torch.testing.assert_close(nll_sum, expected_sum)
    torch.testing.assert_close(count, expected_count)
    assert count.tolist() == [3, 3, 0]


def test_answer_nll_all_masked_is_zero_not_nan_and_float32():
    """No answer token anywhere → sums 0 and counts 0; bf16 logits are scored in float32."""
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    labels = torch.full((2, 4), IGNORE_INDEX)
    nll_sum, count = answer_nll(logits, labels)
    assert nll_sum.dtype == torch.float32
    assert nll_sum.tolist() == [0.0, 0.0] and count.tolist() == [0, 0]


# --- score_qa -----------------------------------------------------------------------------------


def test_score_qa_is_independent_of_batching_and_order(sharp_model, tiny_tokenizer):
    """Padded, length-sorted batches give each pair the avgNLL it gets alone (the model's own loss)."""
    answers = ["Kerravin.", "Ivo Stenmark wrote it in a long winter.", "Delmsford.", "1957"]
    pairs = list(zip(QUESTIONS, answers, strict=True))
    batched = score_qa(sharp_model, tiny_tokenizer, pairs, batch_size=3, max_length=MAX_LENGTH, device="cpu")
    alone = np.array([_hf_avg_nll(sharp_model, tiny_tokenizer, q, a) for q, a in pairs])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    one_by_one = score_qa(
        sharp_model, tiny_tokenizer, pairs, batch_size=1, max_length=MAX_LENGTH, device="cpu"
    )
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_score_qa_restores_training_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    score_qa(tiny_model, tiny_tokenizer, [("q?", "a")], batch_size=2, max_length=MAX_LENGTH, device="cpu")
    assert tiny_model.training


# --- generate_greedy ----------------------------------------------------------------------------


def test_generate_greedy_left_padded_batches_equal_unpadded_rows(sharp_model, tiny_tokenizer):
    """Batch size 3 over 4 prompts of different lengths (left padding, two batches, progress bar)
    equals a plain argmax loop run on each prompt alone."""
    eos = tiny_tokenizer.eos_token_id
    got = generate_greedy(
        sharp_model, tiny_tokenizer, QUESTIONS, max_new_tokens=8, batch_size=3, device="cpu"
    )
    expected = [
        tiny_tokenizer.decode(
            _naive_greedy(sharp_model, tiny_tokenizer, q, 8, eos), skip_special_tokens=True
        ).strip()
        for q in QUESTIONS
    ]
    assert got == expected
    assert len(set(got)) > 1  # the prompts really produce different text


def test_generate_greedy_cuts_each_row_at_its_first_eos(sharp_model, tiny_tokenizer):
    """Take as EOS a token that question 0's free-running greedy output produces at step k ≥ 1:
    that row must come back as exactly its first k tokens, while rows that never emit the token run
    to max_new_tokens (a finished row does not stop the others)."""
    raw = [_naive_greedy(sharp_model, tiny_tokenizer, q, 8, eos=-1) for q in QUESTIONS]
    k = next(i for i in range(1, 8) if raw[0][i] not in raw[0][:i])
    stop = raw[0][k]
    expected = []
    for r in raw:
        cut = r[: r.index(stop)] if stop in r else r
        expected.append(tiny_tokenizer.decode(cut, skip_special_tokens=True).strip())
    got = generate_greedy(
        sharp_model,
        tiny_tokenizer,
        QUESTIONS,
        max_new_tokens=8,
        batch_size=4,
        device="cpu",
        eos_token_id=stop,
    )
    assert got == expected
    assert got[0] == tiny_tokenizer.decode(raw[0][:k], skip_special_tokens=True).strip()


# --- evaluate_splits ----------------------------------------------------------------------------


def _qa_rows(n: int) -> list[dict]:
    return [
        {
            "question": QUESTIONS[i % 4] + " " * i,
            "answer": f"Answer number {i} is Kerravin.",
            "paraphrased_answer": f"It is Kerravin, number {i}.",
            "paraphrased_question": "unused",
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


def _evaluate(model, tok, splits, metrics=("prob", "rouge", "truth_ratio"), **kw):
    return evaluate_splits(
        model,
        tok,
        splits,
        metrics=metrics,
        batch_size=4,
        max_new_tokens=4,
        max_length=MAX_LENGTH,
        device="cpu",
        **kw,
    )


def test_evaluate_splits_keys_and_values(sharp_model, tiny_tokenizer):
    """Keys per split × metric; per-sample prob = exp(−avgNLL) from the model's own loss; forget tr =
    exp(avgNLL(paraphrase) − mean avgNLL(perturbed)) with the min(tr, 1/tr) aggregate; options prob
    normalised over the options."""
    m, tok = sharp_model, tiny_tokenizer
    splits = {"forget": _qa_rows(3), "retain": _qa_rows(4), "world_facts": _options_rows(3)}
    res = _evaluate(m, tok, splits)
    assert set(res.aggregates) == {f"{s}_{k}" for s in splits for k in ("prob", "rouge", "truth_ratio")}
    assert all(math.isfinite(v) for v in res.aggregates.values())
    forget = res.per_sample["forget"]
    assert [r["index"] for r in forget] == [0, 1, 2]
    common = {"index", "question", "answer", "generation", "prob", "rouge", "truth_ratio"}
    assert set(forget[0]) == common | {"author", "attribute"}
    assert set(res.per_sample["world_facts"][0]) == common
    for r, row in zip(forget, splits["forget"], strict=True):
        assert r["prob"] == pytest.approx(
            math.exp(-_hf_avg_nll(m, tok, row["question"], row["answer"])), abs=1e-5
        )
        wrong = np.mean([_hf_avg_nll(m, tok, row["question"], a) for a in row["perturbed_answer"]])
        tr = math.exp(_hf_avg_nll(m, tok, row["question"], row["paraphrased_answer"]) - wrong)
        assert r["truth_ratio"] == pytest.approx(tr, rel=1e-4)
    tr = np.array([r["truth_ratio"] for r in forget])
    np.testing.assert_allclose(res.forget_truth_ratios, tr)
    assert res.aggregates["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(tr, 1 / tr)))
    retain_tr = np.array([r["truth_ratio"] for r in res.per_sample["retain"]])
    assert res.aggregates["retain_truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - retain_tr)))
    row = splits["world_facts"][0]
    p = [
        math.exp(-_hf_avg_nll(m, tok, row["question"], a)) for a in [row["answer"], *row["perturbed_answer"]]
    ]
    assert res.per_sample["world_facts"][0]["prob"] == pytest.approx(p[0] / sum(p), rel=1e-4)


def test_evaluate_splits_one_pass_per_split(monkeypatch, tiny_model, tiny_tokenizer):
    """One score_qa call per split; generation only when rouge is requested; eval mode restored."""
    calls = {"score": 0, "generate": 0}
    real_score, real_generate = suite.score_qa, suite.generate_greedy

    def count(key, fn):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(suite, "score_qa", count("score", real_score))
    monkeypatch.setattr(suite, "generate_greedy", count("generate", real_generate))
    tiny_model.train()
    res = _evaluate(
        tiny_model,
        tiny_tokenizer,
        {"forget": _qa_rows(2), "real_authors": _options_rows(2)},
        ("prob", "truth_ratio"),
    )
    assert calls == {"score": 2, "generate": 0}
    assert "generation" not in res.per_sample["forget"][0]
    assert tiny_model.training


def test_evaluate_splits_max_samples_is_a_deterministic_subset(tiny_model, tiny_tokenizer):
    """Seeded subset of 3 of 6 rows: sorted indices, the same on every call with one seed."""
    splits = {"retain": _qa_rows(6)}
    a = _evaluate(tiny_model, tiny_tokenizer, splits, ("prob",), max_samples=3, seed=7)
    b = _evaluate(tiny_model, tiny_tokenizer, splits, ("prob",), max_samples=3, seed=7)
    idx = [r["index"] for r in a.per_sample["retain"]]
    assert len(idx) == 3 and idx == sorted(idx) and len(set(idx)) == 3
    assert idx == [r["index"] for r in b.per_sample["retain"]]
    assert [r["question"] for r in a.per_sample["retain"]] == [splits["retain"][i]["question"] for i in idx]
    assert a.forget_truth_ratios is None


def test_evaluate_splits_rejects_unknown_metric(tiny_model, tiny_tokenizer):
    assert list(METRICS) == ["prob", "rouge", "truth_ratio"]
    with pytest.raises(ConfigError, match="known: prob, rouge, truth_ratio"):
        _evaluate(tiny_model, tiny_tokenizer, {"forget": _qa_rows(1)}, ("mia",))
