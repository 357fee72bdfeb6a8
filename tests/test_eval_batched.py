"""The evaluator's batched shortcuts (metrics/scoring.py, scored_split.py, tofu.py) give the numbers of
the plain computations they replace: prompts scored once and continued from their cache, per-sample
gradient norms in vmapped batches, greedy answers read off the scoring pass, memoised tokenisation
and stemming, and no heavy import at ``import unlearnflow.metrics``."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearnflow.data.tokenize import IGNORE_INDEX, collate, encode_example, encode_prompt, encode_qa
from unlearnflow.metrics import scoring
from unlearnflow.metrics.scored_split import MemoTokenizer
from unlearnflow.metrics.scoring import (
    generate_greedy,
    grad_norm_scores,
    greedy_from_scored,
    plain_greedy,
    score_examples,
    shared_prompts,
)

MAX_LENGTH = 96
QUESTIONS = [
    "Where was Alda Voss born?",
    "Who wrote The Glass Orchard?",
    "What is the capital of Ostrava Minor?",
]
ANSWERS = ["Kerravin.", "Ivo Stenmark wrote it in a long and cold winter.", "Delmsford", "1957"]


def _qa_examples(tok) -> list[dict[str, list[int]]]:
    """Every question with every answer (targets of 2 to 12 tokens, EOS appended), plus each
    question's one-token multiple-choice letter (no EOS): prompts repeat 5 times."""
    examples = [encode_qa(tok, q, a, max_length=MAX_LENGTH) for q in QUESTIONS for a in ANSWERS]
    prompt = "Question: {}\nAnswer:"
    examples += [
        encode_example(tok, prompt.format(q), " A", max_length=MAX_LENGTH, add_eos=False) for q in QUESTIONS
    ]
    return examples


def _alone(model, example) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """log p, argmax hits, and the predictive mean / variance of log p of each scored token, from
    one unpadded forward of the example alone, position by position in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
    lp, ok, mu, var = [], [], [], []
    for t, label in enumerate(example["labels"]):
        if t == 0 or label == IGNORE_INDEX:
            continue
        dist = torch.log_softmax(logits[t - 1].double(), dim=-1)
        lp.append(float(dist[label]))
        ok.append(int(dist.argmax()) == label)
        m = float((dist.exp() * dist).sum())
        mu.append(m)
        var.append(float((dist.exp() * dist**2).sum()) - m * m)
    return np.array(lp), np.array(ok), np.array(mu), np.array(var)


def test_shared_prompt_scores_equal_each_example_alone(sharp_model, tiny_tokenizer):
    """Prompts shared by 5 targets go through the shared path (2 batches of prompts, several batches of
    continuations each): every example's log p, hits, μ and σ² equal those of a plain forward of it
    alone, and the results come back in the input order."""
    tok = tiny_tokenizer
    examples = _qa_examples(tok)[::-1]  # the input order is not the prompt order
    assert shared_prompts(examples) is not None
    stats = score_examples(
        sharp_model,
        examples,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        batch_size=2,
        device="cpu",
        vocab_stats=True,
    )
    for st, example in zip(stats, examples, strict=True):
        lp, ok, mu, var = _alone(sharp_model, example)
        np.testing.assert_allclose(st.logprobs, lp, atol=1e-5)
        np.testing.assert_array_equal(st.correct, ok)
        np.testing.assert_allclose(st.mu, mu, atol=1e-5)
        np.testing.assert_allclose(st.var, var, atol=1e-4)
        assert st.ends_with_eos == (example["labels"][-1] == tok.eos_token_id)


def test_shared_prompts_only_when_sharing_saves_tokens(tiny_tokenizer):
    """Groups by prompt when prompts repeat; None for distinct prompts (nothing saved), for an example
    without a prompt token before its target, and for one without any scored token."""
    tok = tiny_tokenizer
    examples = _qa_examples(tok)
    groups = shared_prompts(examples)
    assert groups is not None and sorted(len(m) for m in groups.values()) == [5, 5, 5]
    assert sorted(i for m in groups.values() for i in m) == list(range(len(examples)))
    distinct = [encode_qa(tok, q, "Kerravin.", max_length=MAX_LENGTH) for q in QUESTIONS]
    assert shared_prompts(distinct) is None
    no_prompt = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    assert shared_prompts([*examples, no_prompt]) is None
    unscored = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}
    assert shared_prompts([*examples, unscored]) is None


class _NoCacheModel(torch.nn.Module):
    """The model's logits only: no key/value cache to continue from."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        kwargs.pop("use_cache", None)
        return SimpleNamespace(logits=self.inner(**kwargs, use_cache=False).logits)


def test_a_model_without_a_cache_is_scored_on_padded_whole_examples(sharp_model, tiny_tokenizer):
    tok = tiny_tokenizer
    examples = _qa_examples(tok)
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, batch_size=4, device="cpu")
    shared = score_examples(sharp_model, examples, **kw)
    padded = score_examples(_NoCacheModel(sharp_model), examples, **kw)
    for a, b in zip(shared, padded, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


# --- per-sample gradient norms ----------------------------------------------------------------------


def _manual_grad_norm(model, tok, example, p: float) -> float:
    """−mean over parameter tensors (requiring gradients) of ‖∇ mean NLL of the content tokens‖_p, by
    one plain backward of the example alone; the final EOS is left out when there is more than one token."""
    model.zero_grad()
    batch = collate([example], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits[0]
    labels = batch["labels"][0]
    pos = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    if len(pos) > 1 and labels[pos[-1]] == tok.eos_token_id:
        pos = pos[:-1]
    torch.stack([F.cross_entropy(logits[t - 1], labels[t]) for t in pos]).mean().backward()
    norms = [q.grad.norm(p=p) for q in model.parameters() if q.requires_grad and q.grad is not None]
    model.zero_grad()
    return -float(torch.stack(norms).mean())


@pytest.mark.parametrize(("tied", "p"), [(True, 2.0), (False, 2.0), (True, 1.0)])
def test_batched_grad_norms_equal_one_backward_per_example(
    monkeypatch, make_tiny_model, tiny_tokenizer, tied, p
):
    """Examples of 2 to 12 target tokens (so rows are padded), an EOS-only target and one without any
    target token: the vmapped batches (three of them) give each example the score of its own backward,
    tied or untied embeddings, p = 2 or 1, and NaN without a target."""
    tok = tiny_tokenizer
    model = make_tiny_model(tie_word_embeddings=tied)
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(8.0)  # sharper than the init, so the rows' norms differ
    model.model.norm.weight.requires_grad_(False)  # a frozen tensor is left out of the mean
    examples = [encode_qa(tok, q, a, max_length=MAX_LENGTH) for q in QUESTIONS for a in ANSWERS[:3]]
    examples.append(encode_example(tok, "Question: Who?\nAnswer:", "", max_length=MAX_LENGTH))  # EOS only
    examples.append({"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3})
    batches = []
    real = scoring._grad_norms_batched

    def spy(*args, **kwargs):
        for idx, scores in real(*args, **kwargs):
            batches.append(len(idx))
            yield idx, scores

    monkeypatch.setattr(scoring, "_grad_norms_batched", spy)
    n_params = sum(q.numel() for q in model.parameters() if q.requires_grad)
    monkeypatch.setattr(scoring, "GRAD_BATCH_BYTES", 4 * n_params * 4)  # 4 rows per batch
    got = grad_norm_scores(model, examples, eos_token_id=tok.eos_token_id, device="cpu", p=p)
    assert batches == [4, 4, 1]  # the first example runs alone, the other 9 in batches
    assert np.isnan(got[-1])
    for score, example in zip(got[:-1], examples[:-1], strict=True):
        assert score == pytest.approx(_manual_grad_norm(model, tok, example, p), rel=1e-4)
    assert len(set(np.round(got[:-1], 6))) > 3


def test_grad_norms_fall_back_to_one_example_at_a_time(monkeypatch, sharp_model, tiny_tokenizer):
    """No room for two rows of gradients, or a model vmap cannot batch: every score by a plain backward."""
    tok = tiny_tokenizer
    examples = [encode_qa(tok, q, a, max_length=MAX_LENGTH) for q in QUESTIONS for a in ANSWERS[:2]]
    expected = [_manual_grad_norm(sharp_model, tok, ex, 2.0) for ex in examples]
    monkeypatch.setattr(scoring, "GRAD_BATCH_BYTES", 1)
    got = grad_norm_scores(sharp_model, examples, eos_token_id=tok.eos_token_id, device="cpu")
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    monkeypatch.setattr(scoring, "GRAD_BATCH_BYTES", 2**30)

    def unbatchable(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")
        yield  # a generator, as the real one

    monkeypatch.setattr(scoring, "_grad_norms_batched", unbatchable)
    got = grad_norm_scores(sharp_model, examples, eos_token_id=tok.eos_token_id, device="cpu")
    np.testing.assert_allclose(got, expected, rtol=1e-4)


# --- greedy answers read off the scoring pass -------------------------------------------------------


def test_greedy_from_scored_follows_the_target_while_it_is_predicted():
    """Target [7, 8, EOS=2, 9]: all predicted up to EOS → [7, 8]; a miss before EOS → unknown; a cap
    reached while predicted → the first cap tokens; a target that ends before EOS and cap → unknown."""
    hits = np.array([True, True, True, False])
    assert greedy_from_scored([7, 8, 2, 9], hits, eos_token_id=2, max_new_tokens=10) == [7, 8]
    assert (
        greedy_from_scored([7, 8, 2], np.array([True, False, True]), eos_token_id=2, max_new_tokens=10)
        is None
    )
    assert (
        greedy_from_scored([7, 8, 2], np.array([True, True, False]), eos_token_id=2, max_new_tokens=10)
        is None
    )
    assert greedy_from_scored(
        [7, 8, 5, 6], np.array([True, True, False, False]), eos_token_id=2, max_new_tokens=2
    ) == [
        7,
        8,
    ]
    assert greedy_from_scored([7, 8], np.array([True, True]), eos_token_id=2, max_new_tokens=5) is None
    assert greedy_from_scored([2, 7], np.array([True, False]), eos_token_id=2, max_new_tokens=5) == []


def _greedy_ids(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_scored_greedy_continuations_are_read_off_and_match_generate(
    monkeypatch, sharp_model, tiny_tokenizer
):
    """Targets that are the model's own greedy continuations score every token as the argmax, so their
    greedy answers are known without decoding; ``generate_greedy`` runs the model only for the other
    rows, and every text equals plain generation's."""
    tok = tiny_tokenizer
    cap = 6
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]
    own = [_greedy_ids(sharp_model, p, cap) for p in prompts]
    examples = [
        {"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t} for p, t in zip(prompts, own, strict=True)
    ]
    stats = score_examples(
        sharp_model, examples, pad_token_id=tok.pad_token_id, eos_token_id=None, batch_size=4, device="cpu"
    )
    known = [
        greedy_from_scored(t, st.correct, eos_token_id=tok.eos_token_id, max_new_tokens=cap)
        for t, st in zip(own, stats, strict=True)
    ]
    assert all(k is not None for k in known)
    known[1] = None  # this row is decoded
    plain = generate_greedy(sharp_model, tok, prompts, max_new_tokens=cap, batch_size=4, device="cpu")
    calls = []
    real_generate = sharp_model.generate

    def generate(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(sharp_model, "generate", generate)
    got = generate_greedy(
        sharp_model, tok, prompts, max_new_tokens=cap, batch_size=4, device="cpu", known=known
    )
    assert got == plain and calls == [1]
    assert len(set(plain)) > 1


def test_plain_greedy_only_without_logits_processors(tiny_model):
    """A repetition penalty (or beams, a minimum length, ...) makes generate pick other than the
    argmax: then nothing is read off the scoring pass."""
    assert plain_greedy(tiny_model)
    tiny_model.generation_config.repetition_penalty = 1.3
    assert not plain_greedy(tiny_model)
    tiny_model.generation_config.repetition_penalty = 1.0
    tiny_model.generation_config.num_beams = 4
    assert not plain_greedy(tiny_model)


# --- tokenisation, stemming, imports --------------------------------------------------------------------


def test_memo_tokenizer_encodes_as_the_tokenizer_in_one_batched_call(tiny_tokenizer):
    """After a recording pass, encoding a split's examples calls the tokenizer once (a batch) and
    gives the ids the tokenizer gives one call at a time."""
    calls = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kwargs):
            calls.append(text)
            return self.tok(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    memo = MemoTokenizer(Counting(tiny_tokenizer))

    def encode(tok):
        return [encode_qa(tok, q, a, max_length=MAX_LENGTH) for q in QUESTIONS for a in ANSWERS]

    with memo.recording():
        encode(memo)
    assert len(calls) == 1 and isinstance(calls[0], list)
    assert encode(memo) == encode(tiny_tokenizer)
    assert len(calls) == 1


def test_rouge_with_memoised_stems_equals_rouge_score():
    """The memoised stemmer gives rouge-score's own ``use_stemmer=True`` scores (recall and F1)."""
    from rouge_score import rouge_scorer

    from unlearnflow.metrics import tofu

    refs = ["The runners were running quickly", "Caresses and ponies", "She generously donated 1957 books."]
    preds = ["a runner runs quick", "caress the pony", "generous donations of books in 1957"]
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [plain.score(r, p)["rougeL"] for p, r in zip(preds, refs, strict=True)]
    assert tofu.rouge_l_recall(preds, refs) == [e.recall for e in expected]
    assert tofu.rouge_l_f1(preds, refs) == [e.fmeasure for e in expected]
    assert expected[0].recall > 0.2  # stemming matters here: "running" ~ "runs"


def test_importing_the_metrics_loads_no_heavy_library():
    """scikit-learn, scipy, rouge-score and nltk load when a metric needs them, not at import."""
    code = (
        "import sys, unlearnflow.metrics; "
        "print(sorted(m for m in ('sklearn', 'scipy', 'rouge_score', 'nltk', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
