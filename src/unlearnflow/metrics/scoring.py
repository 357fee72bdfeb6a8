"""Model-facing scoring: per-sample answer NLL (batched forwards), greedy generation, and the
per-sample gradient norms of ``mia_grad_norm``.

Everything here is batched and runs with the model in eval mode (its previous mode is restored
afterwards); scoring and generation under ``torch.inference_mode``. The metric maths on the numbers
these functions return lives in ``unlearnflow.metrics.tofu``; the suite that ties them together in
``unlearnflow.metrics.suite``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from unlearnflow.data.tokenize import IGNORE_INDEX, collate, collate_left
from unlearnflow.losses import answer_positions

log = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block (no dropout) and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class TokenStats:
    """What one forward pass tells about one example's target tokens (answer, text or option).

    Attributes:
        logprobs: (n,) log p(token | prefix) of each target token, EOS included when appended.
        correct: (n,) whether the argmax prediction equals the token.
        mu: (n,) E_{v~p}[log p(v)] of the predictive distribution at each position, or None.
        var: (n,) Var_{v~p}[log p(v)], or None (both only when vocabulary stats were asked for).
        ends_with_eos: the last target token is EOS (appended by the encoder, not content).
    """

    logprobs: np.ndarray
    correct: np.ndarray
    mu: np.ndarray | None = None
    var: np.ndarray | None = None
    ends_with_eos: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def avg_nll(self) -> float:
        """avgNLL over every target token (EOS included, as the loss sees it); NaN with none."""
        return float(-self.logprobs.mean()) if self.n_tokens else math.nan

    @property
    def content(self) -> slice:
        """The target tokens without a final EOS: what memorisation and MIA token statistics read."""
        return slice(0, self.n_tokens - 1 if self.ends_with_eos and self.n_tokens > 1 else self.n_tokens)


_CHUNK = 4096  # answer positions per log-softmax chunk: bounds the float32 (K, V) copy on big vocabularies


def _token_stats(
    kept: Tensor, target: Tensor, rows: Tensor, n_rows: int, eos_token_id: int | None, vocab_stats: bool
) -> list[TokenStats]:
    """Per-row ``TokenStats`` of the (K, V) logits ``kept`` that predict the (K,) tokens ``target``,
    ``rows`` saying which of the ``n_rows`` rows each belongs to (row-major order)."""
    parts: dict[str, list[Tensor]] = {"lp": [], "ok": [], "mu": [], "var": []}
    for start in range(0, kept.shape[0], _CHUNK):
        lp = torch.log_softmax(kept[start : start + _CHUNK].float(), dim=-1)
        tgt = target[start : start + _CHUNK]
        parts["lp"].append(lp.gather(1, tgt.unsqueeze(1)).squeeze(1))
        parts["ok"].append(lp.argmax(dim=-1) == tgt)
        if vocab_stats:
            p = lp.exp()
            mu = (p * lp).sum(-1)
            parts["mu"].append(mu)
            parts["var"].append((p * lp.square()).sum(-1) - mu.square())
    sizes = torch.bincount(rows, minlength=n_rows).tolist()

    def split(key: str, dtype: Any) -> list[np.ndarray]:
        if not parts[key]:
            return [np.zeros(0, dtype=dtype) for _ in sizes] if key in ("lp", "ok") else [None] * len(sizes)
        flat = torch.cat(parts[key]).cpu().numpy().astype(dtype)
        return np.split(flat, np.cumsum(sizes)[:-1])

    lps, oks = split("lp", np.float64), split("ok", bool)
    mus, variances = split("mu", np.float64), split("var", np.float64)
    ends = [
        bool(eos_token_id is not None and len(row) and row[-1] == eos_token_id)
        for row in np.split(target.cpu().numpy(), np.cumsum(sizes)[:-1])
    ]
    return [
        TokenStats(logprobs=lps[r], correct=oks[r], mu=mus[r], var=variances[r], ends_with_eos=ends[r])
        for r in range(len(sizes))
    ]


def _length_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by decreasing length (stable), so a batch holds similar lengths and the
    largest batch comes first (an out-of-memory error shows up at once, not at the end)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _batches(order: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start : start + batch_size])


def _progress(total: int, batch_size: int, desc: str) -> Any:
    """A tqdm bar over batches when there is more than one batch, else None."""
    if total <= batch_size:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="sample")


def score_examples(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    batch_size: int,
    device: torch.device | str,
    vocab_stats: bool = False,
    desc: str = "score",
) -> list[TokenStats]:
    """``TokenStats`` of every encoded example: batched forward passes, no gradients.

    This is the pass every token-level metric reads (prob, truth ratio, MIA scores, exact
    memorisation, extraction strength, multiple-choice log-likelihoods): callers put every
    target variant of a split (answer, paraphrase, perturbed answers, options) in one call.

    When many examples share their prompt (the tokens before the first scored one: a question
    with its answer, paraphrase and perturbed answers, or with its options), each distinct prompt
    is run once and its key/value cache continued by every target that follows it
    (``_score_shared_prompts``); otherwise whole examples are sorted by length and right-padded
    (``_score_padded``). Either way a causal model gives each row the values it gets alone: the
    prompt's hidden states do not depend on what follows it, and neither padding nor batch
    composition changes a row's values beyond float rounding. Results come back in the input order.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V); already on ``device``.
        examples: ``{"input_ids", "labels"}`` dicts (``data.tokenize`` encoders).
        pad_token_id: padding id.
        eos_token_id: marks a final EOS target token (left out of ``TokenStats.content``).
        batch_size: rows per forward.
        device: where the inputs go.
        vocab_stats: also compute the predictive distribution's mean and variance of log p at
            each position (Min-K%++ needs them; costs a (K, V) exp).
        desc: progress-bar label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run = _Pass(model, pad_token_id, eos_token_id, batch_size, device, vocab_stats)
    bar = _progress(len(examples), batch_size, desc)
    with eval_mode(model), torch.inference_mode():
        groups = shared_prompts(examples)
        out = _score_shared_prompts(run, examples, groups, bar) if groups is not None else None
        if out is None:
            out = _score_padded(run, examples, bar)
    if bar is not None:
        bar.close()
    return out


@dataclass(frozen=True)
class _Pass:
    """How one ``score_examples`` call runs the model (its arguments)."""

    model: torch.nn.Module
    pad_token_id: int
    eos_token_id: int | None
    batch_size: int
    device: torch.device | str
    vocab_stats: bool

    def stats(self, kept: Tensor, target: Tensor, rows: Tensor, n_rows: int) -> list[TokenStats]:
        return _token_stats(kept, target, rows, n_rows, self.eos_token_id, self.vocab_stats)


# Share prompts only when that skips at least this fraction of the tokens a padded pass would run:
# below it, the extra forward per batch and the cache copies cost about what they save.
SHARED_PROMPT_MIN_SAVING = 0.25


def _first_scored(example: dict[str, list[int]]) -> int:
    """Index of the first token with a label (the prompt is everything before it); -1 if none."""
    return next((t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX), -1)


def shared_prompts(examples: Sequence[dict[str, list[int]]]) -> dict[tuple[int, ...], list[int]] | None:
    """Example indices grouped by their prompt, when scoring each distinct prompt once saves at
    least ``SHARED_PROMPT_MIN_SAVING`` of the tokens; None otherwise, or when an example has no
    prompt token before its first scored token (nothing to share) or no scored token at all."""
    groups: dict[tuple[int, ...], list[int]] = {}
    total = 0
    for i, example in enumerate(examples):
        start = _first_scored(example)
        if start < 1:
            return None
        groups.setdefault(tuple(example["input_ids"][:start]), []).append(i)
        total += len(example["input_ids"])
    saved = sum((len(members) - 1) * len(prompt) for prompt, members in groups.items())
    return groups if total and saved >= SHARED_PROMPT_MIN_SAVING * total else None


def _right_pad(seqs: Sequence[Sequence[int]], fill: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(N, max length) ids right-padded with ``fill``, and the mask of the real tokens."""
    width = max(len(q) for q in seqs)
    ids = [[*q, *[fill] * (width - len(q))] for q in seqs]
    mask = [[1] * len(q) + [0] * (width - len(q)) for q in seqs]
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(
        mask, dtype=torch.long, device=device
    )


def _score_padded(run: _Pass, examples: Sequence[dict[str, list[int]]], bar: Any) -> list[TokenStats]:
    """Whole examples, sorted by length and right-padded, ``batch_size`` rows per forward."""
    out: list[TokenStats | None] = [None] * len(examples)
    for idx in _batches(_length_order([len(e["input_ids"]) for e in examples]), run.batch_size):
        batch = {
            k: v.to(run.device) for k, v in collate([examples[i] for i in idx], run.pad_token_id).items()
        }
        logits = run.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        kept, target, rows = answer_positions(logits, batch["labels"])
        for i, stats in zip(idx, run.stats(kept, target, rows, len(idx)), strict=True):
            out[i] = stats
        if bar is not None:
            bar.update(len(idx))
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class _Prompts:
    """One batch of distinct prompts run through the model: their right-padded attention mask
    (P, T), lengths (P,), key/value cache, and the logits at each one's last token (P, V)."""

    mask: Tensor
    lengths: Tensor
    cache: Any
    last: Tensor


def _run_prompts(run: _Pass, prompts: Sequence[Sequence[int]]) -> _Prompts | None:
    """The prompts through the model with a cache; None if the model returns no cache."""
    ids, mask = _right_pad(prompts, run.pad_token_id, run.device)
    result = run.model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = getattr(result, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    lengths = mask.sum(dim=1)
    last = result.logits[torch.arange(len(prompts), device=run.device), lengths - 1]
    return _Prompts(mask=mask, lengths=lengths, cache=cache, last=last)


def _score_shared_prompts(
    run: _Pass,
    examples: Sequence[dict[str, list[int]]],
    groups: dict[tuple[int, ...], list[int]],
    bar: Any,
) -> list[TokenStats] | None:
    """Each distinct prompt once, then every example's target on the prompt's key/value cache.

    Prompts go ``batch_size`` at a time, longest first; the examples of one batch of prompts then
    go ``batch_size`` rows at a time, longest continuation first (``_score_tails``).

    Returns:
        The stats in input order, or None if the model returns no key/value cache (the caller then
        scores padded whole examples).
    """
    out: list[TokenStats | None] = [None] * len(examples)
    for chunk in _batches(sorted(groups, key=len, reverse=True), run.batch_size):
        prompts = _run_prompts(run, chunk)
        if prompts is None:
            return None
        members = [(i, r) for r, prompt in enumerate(chunk) for i in groups[prompt]]
        members.sort(key=lambda m: len(examples[m[0]]["input_ids"]) - len(chunk[m[1]]), reverse=True)
        for part in _batches(members, run.batch_size):
            starts = [len(chunk[r]) for _, r in part]
            rows = torch.tensor([r for _, r in part], device=run.device)
            for (i, _), st in zip(
                part, _score_tails(run, prompts, rows, [examples[i] for i, _ in part], starts), strict=True
            ):
                out[i] = st
            if bar is not None:
                bar.update(len(part))
    return out  # type: ignore[return-value]


def _score_tails(
    run: _Pass,
    prompts: _Prompts,
    rows: Tensor,
    examples: Sequence[dict[str, list[int]]],
    starts: Sequence[int],
) -> list[TokenStats]:
    """Stats of ``examples``, example k continuing prompt ``rows[k]`` (its first ``starts[k]`` tokens).

    The logits at the prompt's last token predict an example's first scored token; the example's
    tokens after the prompt, its final token left out (its logits would predict nothing), then run
    on a copy of its prompt's cache rows, at positions that continue the prompt's, with the
    prompt's padding masked out, and predict the rest.
    """
    tails = [e["input_ids"][s:-1] for e, s in zip(examples, starts, strict=True)]
    targets, _ = _right_pad(
        [e["labels"][s:] for e, s in zip(examples, starts, strict=True)], IGNORE_INDEX, run.device
    )
    logits = prompts.last[rows].unsqueeze(1)  # (N, 1, V)
    if any(tails):
        ids, mask = _right_pad(tails, run.pad_token_id, run.device)
        cache = copy.deepcopy(prompts.cache)  # the prompts' cache serves every batch of their examples
        cache.batch_select_indices(rows)
        tail_logits = run.model(
            input_ids=ids,
            attention_mask=torch.cat([prompts.mask[rows], mask], dim=1),
            position_ids=prompts.lengths[rows].unsqueeze(1) + torch.arange(ids.shape[1], device=run.device),
            past_key_values=cache,
            use_cache=True,
        ).logits
        # (N, 1 + width, V): logits[:, j] predicts targets[:, j]
        logits = torch.cat([logits, tail_logits], dim=1)
    keep = targets != IGNORE_INDEX
    row_index = torch.arange(len(examples), device=run.device).unsqueeze(1).expand_as(targets)[keep]
    return run.stats(logits[keep], targets[keep], row_index, len(examples))


# New tokens of a row's first decoding round; each later round decodes twice as many (generate_greedy).
FIRST_ROUND_TOKENS = 16


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    eos_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    known: Sequence[list[int] | None] | None = None,
    first_round_tokens: int = FIRST_ROUND_TOKENS,
) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids, e.g. ``encode_prompt``), batched.

    Prompts are sorted by length and left-padded with ``collate_left`` so every row's next token
    sits at the same position; ``model.generate`` builds position ids from the attention mask, so
    a padded row decodes exactly as it would alone. Each row is cut at its first EOS, decoded
    without special tokens, then cut at the first of ``stop_strings`` (MUSE knowmem's "\n\n",
    "Question:"), which for greedy decoding equals stopping there.

    Decoding runs in rounds. A batch decodes until its longest row ends, and on an unlearned model
    one row that never emits EOS kept a whole batch decoding to the cap while its other rows had
    ended within 10-20 tokens (about 6x the row-steps needed). So round r decodes at most
    ``first_round_tokens``·2^r new tokens; the rows still running then continue from their prompt
    plus what they produced, re-batched by length with the other long ones. Greedy decoding is a
    function of the prefix alone, so the text is the same as one uninterrupted run (the re-read
    prefix's logits differ only by float rounding, as between any two batchings).

    Args:
        model: a Hugging Face causal LM (``generate``); already on ``device``.
        tokenizer: its tokenizer.
        prompts: N prompt id lists (BOS included where the model uses one).
        max_new_tokens: generation cap per row.
        batch_size: rows per ``generate`` call.
        device: where the inputs go.
        eos_token_id: stop token; default ``tokenizer.eos_token_id``.
        stop_strings: texts that end an answer.
        known: per prompt, its greedy tokens (cut before EOS) when already known
            (``greedy_from_scored``), else None; known rows are decoded without running the model.
        first_round_tokens: the first round's cap on new tokens (>= 1).

    Returns:
        N generated texts (new text only), whitespace-stripped, in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if first_round_tokens < 1:
        raise ValueError(f"first_round_tokens must be >= 1, got {first_round_tokens}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def finish(row: list[int]) -> str:
        if eos in row:
            row = row[: row.index(eos)]
        text = tokenizer.decode(row, skip_special_tokens=True)
        for stop in stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()

    known = known if known is not None else [None] * len(prompts)
    out = [finish(k) if k is not None else "" for k in known]
    todo = [i for i, k in enumerate(known) if k is None]
    produced: dict[int, list[int]] = {i: [] for i in todo}
    bar = _progress(len(todo), batch_size, "generate")
    horizon = first_round_tokens
    with eval_mode(model), torch.inference_mode():
        while todo:
            # Every row still running has produced the same number of tokens: each earlier round's cap.
            cap = min(horizon, max_new_tokens - len(produced[todo[0]]))
            running = []
            order = [todo[j] for j in _length_order([len(prompts[i]) for i in todo])]
            for idx in _batches(order, batch_size):
                rows = [list(prompts[i]) + produced[i] for i in idx]
                batch = {k: v.to(device) for k, v in collate_left(rows, pad).items()}
                generated = model.generate(
                    **batch, do_sample=False, max_new_tokens=cap, pad_token_id=pad, eos_token_id=eos
                )
                new_tokens = generated[:, batch["input_ids"].shape[1] :].cpu().tolist()
                for i, row in zip(idx, new_tokens, strict=True):
                    produced[i] += row
                    if eos in row or len(produced[i]) >= max_new_tokens:
                        out[i] = finish(produced[i])
                        if bar is not None:
                            bar.update(1)
                    else:
                        running.append(i)
            todo, horizon = running, 2 * horizon
    if bar is not None:
        bar.close()
    return out


def greedy_from_scored(
    target: Sequence[int], correct: np.ndarray, *, eos_token_id: int, max_new_tokens: int
) -> list[int] | None:
    """The greedy continuation of a prompt, when scoring one of its targets already shows it.

    Scoring a target y after prompt x computes the argmax next token at every y_t given x and y_<t
    (``TokenStats.correct``). While the argmax equals y_t, greedy decoding from x emits exactly y_t
    (its prefix is then x, y_<t too), so if every token up to the first EOS, or up to the cap
    ``max_new_tokens``, is predicted, greedy decoding outputs y up to there: the verification step
    of speculative decoding (Leviathan et al. 2023, arXiv:2211.17192) with the target as draft.
    A model that reproduces its answers thus needs no decoding for them.

    Args:
        target: the scored token ids y (labels after the prompt), EOS included when appended.
        correct: (len(target),) whether the argmax prediction equals each y_t.
        eos_token_id: the token that ends generation.
        max_new_tokens: the generation cap.

    Returns:
        The generated tokens, cut before EOS, or None when greedy decoding leaves the target first
        (a token not predicted) or would run past its end.
    """
    for t in range(min(len(target), max_new_tokens)):
        if not correct[t]:
            return None
        if target[t] == eos_token_id:
            return list(target[:t])
    return list(target[:max_new_tokens]) if len(target) >= max_new_tokens else None


# generation_config fields that make greedy ``generate`` pick something else than the argmax of
# the model's logits (transformers' ``_get_logits_processor``, beam and contrastive search), with
# their neutral values: with any other value, no greedy output is taken from scoring.
_GREEDY_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "penalty_alpha": (None, 0, 0.0),
    "guidance_scale": (None, 1, 1.0),
    "sequence_bias": (None,),
    "repetition_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
}


def plain_greedy(model: torch.nn.Module) -> bool:
    """Whether ``model.generate(do_sample=False)`` is plain greedy decoding (the argmax at each step)
    under the model's own ``generation_config``."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return False
    return all(getattr(config, name, None) in neutral for name, neutral in _GREEDY_NEUTRAL.items())


# Per-sample gradients the batched grad-norm pass holds at once (float32 bytes): about a quarter GiB
# whatever the model size; a model too big for two samples at a time runs them one by one.
GRAD_BATCH_BYTES = 256 * 2**20


def grad_norm_scores(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    eos_token_id: int | None,
    device: torch.device | str,
    p: float = 2.0,
) -> np.ndarray:
    """Gradient-norm membership scores (Wang et al. 2024, arXiv:2402.17012; open-unlearning ``gradnorm``).

    For each example alone: the loss is the mean NLL of its content tokens (final EOS left out, as
    the other token statistics), and the score is minus the mean over parameter tensors of the
    p-norm of that loss's gradient: training data sits where the loss surface is flat, so a
    member has small gradients and a higher score.

    The first example runs alone (``_grad_norm_one``), which also tells which parameter tensors the
    loss reaches (one it never reaches has no gradient and is left out of the mean). The others get
    their gradients in batches, one per example (``torch.func``: ``vmap`` of ``grad`` over right-padded
    rows, ``_grad_norms_batched``): each row's loss reads only its own tokens, and the causal mask
    keeps the padding after them out of their logits, so a row's gradient is the one it gets alone
    (up to float rounding). Batches hold at most ``GRAD_BATCH_BYTES`` of gradients; a model that
    ``vmap`` cannot batch (data-dependent control flow) falls back to one example at a time.

    Returns:
        (N,) scores (higher = more likely member); NaN for an example without target tokens.
    """
    params = {name: q for name, q in model.named_parameters() if q.requires_grad}
    if not params:
        raise ValueError("grad_norm needs parameters that require gradients")
    out = np.full(len(examples), np.nan)
    weights = [_content_weights(ex["labels"], eos_token_id) for ex in examples]
    todo = [i for i, w in enumerate(weights) if w is not None]
    bar = _progress(len(todo), 1, "grad_norm")
    with eval_mode(model):
        if todo:
            first = todo.pop(0)
            out[first], used = _grad_norm_one(model, examples[first], params, eos_token_id, device, p)
            if bar is not None:
                bar.update(1)
            per_batch = GRAD_BATCH_BYTES // (4 * sum(params[n].numel() for n in used))
            if per_batch >= 2 and todo:
                try:
                    for idx, scores in _grad_norms_batched(
                        model, examples, weights, todo, {n: params[n] for n in used}, per_batch, device, p
                    ):
                        out[idx] = scores
                        if bar is not None:
                            bar.update(len(idx))
                    todo = []
                except (RuntimeError, NotImplementedError) as exc:
                    log.warning("per-sample gradients in batches failed (%s); one example at a time", exc)
                    todo = [i for i in todo if np.isnan(out[i])]
            for i in todo:
                out[i], _ = _grad_norm_one(model, examples[i], params, eos_token_id, device, p)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _content_weights(labels: Sequence[int], eos_token_id: int | None) -> list[float] | None:
    """(T − 1,) weights of the next-token predictions ``logits[t]`` → ``labels[t + 1]``: 1 on content
    tokens (scored, final EOS left out when there is more than one), 0 elsewhere; None without any."""
    weights = [float(label != IGNORE_INDEX) for label in labels[1:]]
    scored = [t for t, w in enumerate(weights) if w]
    if not scored:
        return None
    if eos_token_id is not None and len(scored) > 1 and labels[scored[-1] + 1] == eos_token_id:
        weights[scored[-1]] = 0.0
    return weights


def _grad_norm_one(
    model: torch.nn.Module,
    example: dict[str, list[int]],
    params: dict[str, Tensor],
    eos_token_id: int | None,
    device: torch.device | str,
    p: float,
) -> tuple[float, list[str]]:
    """One example's score by a plain forward and backward, and the names of the parameters its
    loss reaches (``autograd.grad(allow_unused=True)`` gives the others no gradient)."""
    batch = {k: v.to(device) for k, v in collate([example], 0).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kept, target, _ = answer_positions(logits, batch["labels"])
    if eos_token_id is not None and len(target) > 1 and int(target[-1]) == eos_token_id:
        kept, target = kept[:-1], target[:-1]
    loss = torch.nn.functional.cross_entropy(kept.float(), target)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    used = [name for name, g in zip(params, grads, strict=True) if g is not None]
    norms = [g.detach().norm(p=p) for g in grads if g is not None]
    return -float(torch.stack(norms).mean()), used


def _grad_norms_batched(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    weights: Sequence[list[float] | None],
    todo: Sequence[int],
    params: dict[str, Tensor],
    per_batch: int,
    device: torch.device | str,
    p: float,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Scores of ``todo`` in batches of ``per_batch``: per-sample gradients of each row's weighted
    mean NLL by ``torch.func.vmap(grad(...))``, yielded as (example indices, scores)."""
    from torch.func import functional_call, grad, vmap

    def loss(theta: dict[str, Tensor], ids: Tensor, targets: Tensor, w: Tensor) -> Tensor:
        # No attention mask: rows are right-padded, and causal attention keeps the padding after a
        # row's tokens out of their logits, as if the row were alone.
        logits = functional_call(model, theta, (ids.unsqueeze(0),), {"use_cache": False}).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        return (nll * w).sum() / w.sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    theta = {name: q.detach() for name, q in params.items()}
    order = sorted(todo, key=lambda i: -len(examples[i]["input_ids"]))  # similar lengths together
    for idx in _batches(order, per_batch):
        batch = collate([examples[i] for i in idx], 0)
        targets = batch["labels"][:, 1:].clamp(min=0)  # any id where the weight is 0
        w = torch.zeros(targets.shape)
        for k, i in enumerate(idx):
            w[k, : len(weights[i])] = torch.tensor(weights[i])
        with warnings.catch_warnings():
            # vmap runs the CPU flash-attention kernel row by row; correct, only slower
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = per_sample(theta, batch["input_ids"].to(device), targets.to(device), w.to(device))
        norms = torch.stack([g.detach().flatten(1).norm(p=p, dim=1) for g in grads.values()], dim=1)
        yield idx, (-norms.mean(dim=1)).cpu().double().numpy()
