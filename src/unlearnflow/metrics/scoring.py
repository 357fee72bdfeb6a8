"""Model-facing scoring: per-sample answer NLL (one forward per batch) and greedy generation.

Everything here is batched and runs under ``torch.inference_mode`` with the model in eval mode
(its previous mode is restored afterwards). The metric maths on the numbers these functions
return lives in ``unlearnflow.metrics.tofu``; the suite that ties them together in
``unlearnflow.metrics.suite``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unlearnflow.data.tokenize import collate, collate_left
from unlearnflow.losses import answer_positions

log = logging.getLogger(__name__)


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
    logits: Tensor, labels: Tensor, eos_token_id: int | None, vocab_stats: bool
) -> list[TokenStats]:
    """Per-row ``TokenStats`` of one batch's logits (the shifted answer mask of ``answer_positions``)."""
    kept, target, rows = answer_positions(logits, labels)
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
    sizes = torch.bincount(rows, minlength=labels.shape[0]).tolist()

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


def _batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
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
    """``TokenStats`` of every encoded example: one batched forward pass, no gradients.

    This is the pass every token-level metric reads (prob, truth ratio, MIA scores, exact
    memorisation, extraction strength, multiple-choice log-likelihoods): callers put every
    target variant of a split (answer, paraphrase, perturbed answers, options) in one call.
    Examples are sorted by length to cut padding and right-padded; padding and batch composition
    do not change a row's values (up to float error). Results come back in the input order.

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
    out: list[TokenStats | None] = [None] * len(examples)
    order = _length_order([len(e["input_ids"]) for e in examples])
    bar = _progress(len(examples), batch_size, desc)
    with eval_mode(model), torch.inference_mode():
        for idx in _batches(order, batch_size):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_token_id).items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            for i, stats in zip(
                idx, _token_stats(logits, batch["labels"], eos_token_id, vocab_stats), strict=True
            ):
                out[i] = stats
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


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
) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids, e.g. ``encode_prompt``), batched.

    Prompts are sorted by length and left-padded with ``collate_left`` so every row's next token
    sits at the same position; ``model.generate`` builds position ids from the attention mask, so
    a padded row decodes exactly as it would alone. A batch ends when every row has produced EOS
    or after ``max_new_tokens``; each row is cut at its first EOS, decoded without special tokens,
    then cut at the first of ``stop_strings`` (MUSE knowmem's "\n\n", "Question:"), which for greedy
    decoding equals stopping there.

    Args:
        model: a Hugging Face causal LM (``generate``); already on ``device``.
        tokenizer: its tokenizer.
        prompts: N prompt id lists (BOS included where the model uses one).
        max_new_tokens: generation cap per row.
        batch_size: rows per ``generate`` call.
        device: where the inputs go.
        eos_token_id: stop token; default ``tokenizer.eos_token_id``.
        stop_strings: texts that end an answer.

    Returns:
        N generated texts (new text only), whitespace-stripped, in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = [""] * len(prompts)
    order = _length_order([len(p) for p in prompts])
    bar = _progress(len(prompts), batch_size, "generate")
    with eval_mode(model), torch.inference_mode():
        for idx in _batches(order, batch_size):
            batch = {k: v.to(device) for k, v in collate_left([list(prompts[i]) for i in idx], pad).items()}
            generated = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :].cpu().tolist()
            for i, row in zip(idx, new_tokens, strict=True):
                if eos in row:
                    row = row[: row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True)
                for stop in stop_strings:
                    text = text.split(stop, 1)[0]
                out[i] = text.strip()
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


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
    member has small gradients and a higher score. One forward and backward per example: the
    only metric that cannot share the batched inference pass.

    Returns:
        (N,) scores (higher = more likely member); NaN for an example without target tokens.
    """
    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise ValueError("grad_norm needs parameters that require gradients")
    out = np.full(len(examples), np.nan)
    bar = _progress(len(examples), 1, "grad_norm")
    with eval_mode(model):
        for i, ex in enumerate(examples):
            batch = {k: v.to(device) for k, v in collate([ex], 0).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kept, target, _ = answer_positions(logits, batch["labels"])
            if eos_token_id is not None and len(target) > 1 and int(target[-1]) == eos_token_id:
                kept, target = kept[:-1], target[:-1]
            if len(target):
                loss = torch.nn.functional.cross_entropy(kept.float(), target)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms = [g.detach().norm(p=p) for g in grads if g is not None]
                out[i] = -float(torch.stack(norms).mean())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out
