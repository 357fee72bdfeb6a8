"""Model-facing scoring: per-sample answer NLL (one forward per batch) and greedy generation.

Everything here is batched and runs under ``torch.inference_mode`` with the model in eval mode
(its previous mode is restored afterwards). The metric maths on the numbers these functions
return lives in ``unlearnflow.metrics.tofu``; the suite that ties them together in
``unlearnflow.metrics.suite``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unlearnflow.data.tokenize import collate, collate_left, encode_prompt, encode_qa
from unlearnflow.losses import sequence_nll

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


def answer_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over the answer tokens of each row, and their count.

    ALGORITHMS.md notation: returns seqNLL per sequence and the number of answer tokens, so
    avgNLL = sum / count. Position t's logits predict token t+1: ``logits[:, :-1]`` is scored
    against ``labels[:, 1:]``; positions whose shifted label is ``IGNORE_INDEX`` (-100: BOS,
    prompt, padding) are left out. Delegates to ``losses.sequence_nll`` (the one implementation).

    Args:
        logits: (B, T, V) model outputs, any float dtype.
        labels: (B, T) token ids, ``IGNORE_INDEX`` where no loss falls.

    Returns:
        ``(nll_sum, count)``: (B,) float32 sums and (B,) int64 counts; a row with no answer token
        has sum 0 and count 0 (never NaN).
    """
    nll_sum, count = sequence_nll(logits, labels)
    return nll_sum, count.long()


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


def score_qa(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    max_length: int,
    device: torch.device | str,
) -> np.ndarray:
    """avgNLL of each answer given its question: one forward per batch, no gradients.

    Pairs are tokenised with ``encode_qa`` (loss on answer + EOS only), sorted by length to cut
    padding, right-padded with ``collate`` and scored with ``answer_nll``; results come back in the
    input order. Padding and batch composition do not change a row's value (up to float error).
    Callers should pass every answer variant of a split (answer, paraphrase, perturbed) in one
    call, so the split costs one pass.

    Args:
        model: a causal LM returning ``.logits`` (B, T, V); already on ``device``.
        tokenizer: its tokenizer (``pad_token_id`` and ``eos_token_id`` set).
        pairs: N ``(question, answer)`` pairs.
        batch_size: rows per forward.
        max_length: token cap per pair (the answer is truncated, never the prompt).
        device: where the inputs go.

    Returns:
        (N,) float64 avgNLL = seqNLL / answer tokens; NaN for a pair with no answer token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_qa(tokenizer, q, a, max_length=max_length) for q, a in pairs]
    out = np.full(len(encoded), np.nan, dtype=np.float64)
    order = _length_order([len(e["input_ids"]) for e in encoded])
    bar = _progress(len(encoded), batch_size, "score")
    with eval_mode(model), torch.inference_mode():
        for idx in _batches(order, batch_size):
            batch = {
                k: v.to(device) for k, v in collate([encoded[i] for i in idx], tokenizer.pad_token_id).items()
            }
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            nll_sum, count = answer_nll(logits, batch["labels"])
            nll_sum, count = nll_sum.cpu().double().numpy(), count.cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                out[idx] = np.where(count > 0, nll_sum / np.maximum(count, 1), np.nan)
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    eos_token_id: int | None = None,
) -> list[str]:
    """Greedy answers to ``questions``, as TOFU's ROUGE evaluation generates them.

    Prompts are ``encode_prompt`` ids (the same prefix ``encode_qa`` scores), sorted by length and
    left-padded with ``collate_left`` so every row's next token sits at the same position;
    ``model.generate`` builds position ids from the attention mask, so a padded row decodes exactly
    as it would alone. Generation of a batch ends when every row has produced EOS or after
    ``max_new_tokens``; each row is cut at its first EOS and decoded without special tokens.

    Args:
        model: a Hugging Face causal LM (``generate``); already on ``device``.
        tokenizer: its tokenizer.
        questions: N question texts.
        max_new_tokens: generation cap per row.
        batch_size: rows per ``generate`` call.
        device: where the inputs go.
        eos_token_id: stop token; default ``tokenizer.eos_token_id``.

    Returns:
        N generated answers (new text only), whitespace-stripped, in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    out: list[str] = [""] * len(prompts)
    order = _length_order([len(p) for p in prompts])
    bar = _progress(len(prompts), batch_size, "generate")
    with eval_mode(model), torch.inference_mode():
        for idx in _batches(order, batch_size):
            batch = {k: v.to(device) for k, v in collate_left([prompts[i] for i in idx], pad).items()}
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
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out
