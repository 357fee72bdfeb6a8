"""Batched scoring and generation (metrics/scoring.py) and the metric suite (metrics/suite.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearnflow.data.tokenize import IGNORE_INDEX, collate, encode_prompt, encode_qa
from unlearnflow.losses import sequence_nll
from unlearnflow.metrics.scoring import (
    TokenStats,
    generate_greedy,
    grad_norm_scores,
    score_examples,
)

MAX_LENGTH = 96

QUESTIONS = [
    "Where was Alda Voss born?",
    "Who wrote The Glass Orchard?",
    "What is the capital of Ostrava Minor?",
    "In which year was Cira Maelor born?",
]


def _hf_avg_nll(model, tokenizer, question: str, answer: str) -> float:
    """Independent avgNLL: the model's own shifted mean cross-entropy on one unpadded pair."""
    batch = collate([encode_qa(tokenizer, question, answer, max_length=MAX_LENGTH)], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def _prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, q) for q in QUESTIONS]


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


# --- sequence_nll (the mask every score goes through) ---------------------------------------------------------------------------------


def test_sequence_nll_matches_plain_cross_entropy():
    """Row 0: prompt (2 tokens) + 3 answer tokens + 1 padding; row 1: no padding; row 2 all masked.
    Reference: Σ_t CE(logits[b, t−1], labels[b, t]) over unmasked t ≥ 1, one position at a time."""
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2] = IGNORE_INDEX
    labels[0, 5] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    nll_sum, count = sequence_nll(logits, labels)
    count = count.long()
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


def test_sequence_nll_all_masked_is_zero_not_nan_and_float32():
    """No answer token anywhere → sums 0 and counts 0; bf16 logits are scored in float32."""
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    labels = torch.full((2, 4), IGNORE_INDEX)
    nll_sum, count = sequence_nll(logits, labels)
    count = count.long()
    assert nll_sum.dtype == torch.float32
    assert nll_sum.tolist() == [0.0, 0.0] and count.tolist() == [0, 0]


# --- score_examples: avgNLL -----------------------------------------------------------------------------------


def _avg_nll(model, tok, pairs, batch_size: int) -> np.ndarray:
    examples = [encode_qa(tok, q, a, max_length=MAX_LENGTH) for q, a in pairs]
    stats = score_examples(
        model,
        examples,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        batch_size=batch_size,
        device="cpu",
    )
    return np.array([st.avg_nll for st in stats])


def test_score_examples_is_independent_of_batching_and_order(sharp_model, tiny_tokenizer):
    """Padded, length-sorted batches give each pair the avgNLL it gets alone (the model's own loss)."""
    answers = ["Kerravin.", "Ivo Stenmark wrote it in a long winter.", "Delmsford.", "1957"]
    pairs = list(zip(QUESTIONS, answers, strict=True))
    batched = _avg_nll(sharp_model, tiny_tokenizer, pairs, batch_size=3)
    alone = np.array([_hf_avg_nll(sharp_model, tiny_tokenizer, q, a) for q, a in pairs])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    one_by_one = _avg_nll(sharp_model, tiny_tokenizer, pairs, batch_size=1)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_score_examples_restores_training_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    _avg_nll(tiny_model, tiny_tokenizer, [("q?", "a")], batch_size=2)
    assert tiny_model.training


# --- generate_greedy ----------------------------------------------------------------------------


def test_generate_greedy_left_padded_batches_equal_unpadded_rows(sharp_model, tiny_tokenizer):
    """Batch size 3 over 4 prompts of different lengths (left padding, two batches, progress bar)
    equals a plain argmax loop run on each prompt alone."""
    eos = tiny_tokenizer.eos_token_id
    got = generate_greedy(
        sharp_model, tiny_tokenizer, _prompts(tiny_tokenizer), max_new_tokens=8, batch_size=3, device="cpu"
    )
    expected = [
        tiny_tokenizer.decode(
            _naive_greedy(sharp_model, tiny_tokenizer, q, 8, eos), skip_special_tokens=True
        ).strip()
        for q in QUESTIONS
    ]
    assert got == expected
    assert len(set(got)) > 1  # the prompts really produce different text


def test_generate_greedy_rounds_equal_one_uninterrupted_run(sharp_model, tiny_tokenizer):
    """Rounds of 1, 2, 4 … new tokens (rows that have not ended continue from prompt + output,
    re-batched) give every row the text of the plain argmax loop, EOS cuts included: a token that
    question 0 emits at step k >= 1 serves as EOS, so that row ends in an early round while the
    others run on to the cap."""
    raw = [_naive_greedy(sharp_model, tiny_tokenizer, q, 9, eos=-1) for q in QUESTIONS]
    k = next(i for i in range(1, 9) if raw[0][i] not in raw[0][:i])
    stop = raw[0][k]
    expected = [
        tiny_tokenizer.decode(r[: r.index(stop)] if stop in r else r, skip_special_tokens=True).strip()
        for r in raw
    ]
    kwargs = {"max_new_tokens": 9, "batch_size": 3, "device": "cpu", "eos_token_id": stop}
    got = generate_greedy(
        sharp_model, tiny_tokenizer, _prompts(tiny_tokenizer), first_round_tokens=1, **kwargs
    )
    assert got == expected
    assert got == generate_greedy(
        sharp_model, tiny_tokenizer, _prompts(tiny_tokenizer), first_round_tokens=100, **kwargs
    )
    assert any(len(g) > len(expected[0]) for g in got)  # some rows did run past the first rounds


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
        _prompts(tiny_tokenizer),
        max_new_tokens=8,
        batch_size=4,
        device="cpu",
        eos_token_id=stop,
    )
    assert got == expected
    assert got[0] == tiny_tokenizer.decode(raw[0][:k], skip_special_tokens=True).strip()


# --- score_examples / TokenStats -------------------------------------------------------------


def _reference_token_stats(model, tokenizer, question: str, answer: str):
    """Per-token log p, argmax hits, and the predictive mean / variance of log p, from one unpadded
    forward computed position by position."""
    enc = encode_qa(tokenizer, question, answer, max_length=MAX_LENGTH)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    lp, ok, mu, var = [], [], [], []
    for t, label in enumerate(enc["labels"]):
        if t == 0 or label == IGNORE_INDEX:
            continue
        dist = torch.log_softmax(logits[t - 1].double(), dim=-1)
        lp.append(float(dist[label]))
        ok.append(int(dist.argmax()) == label)
        p = dist.exp()
        m = float((p * dist).sum())
        mu.append(m)
        var.append(float((p * dist**2).sum()) - m * m)
    return np.array(lp), np.array(ok), np.array(mu), np.array(var)


def test_score_examples_token_stats_match_a_position_by_position_reference(sharp_model, tiny_tokenizer):
    """Batched (padded, length-sorted) stats equal the per-position reference; the appended EOS is
    the last target token and is left out of ``content``; avgNLL equals the model's own loss."""
    tok = tiny_tokenizer
    answers = ["Kerravin.", "Ivo Stenmark wrote it in a long winter.", "Delmsford.", "1957"]
    examples = [encode_qa(tok, q, a, max_length=MAX_LENGTH) for q, a in zip(QUESTIONS, answers, strict=True)]
    stats = score_examples(
        sharp_model,
        examples,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        batch_size=3,
        device="cpu",
        vocab_stats=True,
    )
    for st, q, a in zip(stats, QUESTIONS, answers, strict=True):
        lp, ok, mu, var = _reference_token_stats(sharp_model, tok, q, a)
        np.testing.assert_allclose(st.logprobs, lp, atol=1e-5)
        np.testing.assert_array_equal(st.correct, ok)
        np.testing.assert_allclose(st.mu, mu, atol=1e-5)
        np.testing.assert_allclose(st.var, var, atol=1e-4)
        assert st.ends_with_eos and st.content == slice(0, len(lp) - 1)
        assert st.avg_nll == pytest.approx(_hf_avg_nll(sharp_model, tok, q, a), abs=1e-5)


def test_token_stats_content_keeps_a_target_without_eos():
    st = TokenStats(logprobs=np.array([-1.0, -2.0]), correct=np.array([True, False]), ends_with_eos=False)
    assert st.content == slice(0, 2) and st.avg_nll == pytest.approx(1.5)
    assert math.isnan(TokenStats(logprobs=np.zeros(0), correct=np.zeros(0, bool)).avg_nll)


def test_grad_norm_scores_match_a_manual_backward(sharp_model, tiny_tokenizer):
    """score = −mean over parameter tensors of ‖∇ mean NLL(content tokens)‖₂, one example at a time."""
    tok = tiny_tokenizer
    examples = [encode_qa(tok, q, "Kerravin.", max_length=MAX_LENGTH) for q in QUESTIONS[:2]]
    got = grad_norm_scores(sharp_model, examples, eos_token_id=tok.eos_token_id, device="cpu")
    for score, ex in zip(got, examples, strict=True):
        sharp_model.zero_grad()
        batch = collate([ex], tok.pad_token_id)
        logits = sharp_model(input_ids=batch["input_ids"]).logits[0]
        labels = batch["labels"][0]
        pos = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX][:-1]  # final EOS out
        loss = torch.stack([F.cross_entropy(logits[t - 1], labels[t]) for t in pos]).mean()
        loss.backward()
        norms = [p.grad.norm() for p in sharp_model.parameters() if p.grad is not None]
        assert score == pytest.approx(-float(torch.stack(norms).mean()), rel=1e-4)
    sharp_model.zero_grad()


def test_generate_greedy_cuts_at_stop_strings(sharp_model, tiny_tokenizer):
    """A stop string ends the answer where it first occurs (what stopping generation there gives)."""

    def first(stops: tuple[str, ...] = ()) -> str:
        prompts = _prompts(tiny_tokenizer)[:1]
        return generate_greedy(
            sharp_model,
            tiny_tokenizer,
            prompts,
            max_new_tokens=8,
            batch_size=1,
            device="cpu",
            stop_strings=stops,
        )[0]

    full = first()
    stop = full.split()[1] if len(full.split()) > 1 else full[1:3]
    assert stop and stop in full, full
    cut = first((stop,))
    assert cut == full.split(stop, 1)[0].strip()
