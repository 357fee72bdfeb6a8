"""QA tokenisation with answer-only labels, and the padding collators.

A QA pair becomes ``[bos] prompt answer eos`` where the prompt is ``format_prompt(question)``.
Prompt and answer are tokenised separately and concatenated, so the answer's tokens do not
depend on the prompt (a BPE merge across the boundary would make "the answer" ambiguous).
Labels are the input ids on answer (and EOS) positions and ``IGNORE_INDEX`` everywhere else; the
model shifts them itself, so the loss falls on predicting answer tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The text the model is conditioned on; the answer follows after one space."""
    return template.format(question=question)


def encode_qa(
    tokenizer: Any, question: str, answer: str, *, max_length: int, template: str = PROMPT_TEMPLATE
) -> dict[str, list[int]]:
    """Token ids and labels of one QA pair.

    Args:
        tokenizer: a Hugging Face tokenizer (``eos_token_id`` required, ``bos_token_id`` optional).
        question: the question text.
        answer: the answer text (a leading space is added, as it follows "Answer:").
        max_length: total length cap; the answer is truncated from its end, never the prompt.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; labels are ``IGNORE_INDEX`` on
        BOS and prompt positions.
    """
    prompt_ids = tokenizer(format_prompt(question, template), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    answer_ids = [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for the answer (max_length={max_length})"
        )
    answer_ids = answer_ids[:room]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def encode_prompt(tokenizer: Any, question: str, *, template: str = PROMPT_TEMPLATE) -> list[int]:
    """Prompt ids for generation: the same tokens ``encode_qa`` puts before the answer."""
    ids = tokenizer(format_prompt(question, template), add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else list(ids)


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into ``input_ids``, ``attention_mask``, ``labels`` (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_left(prompts: Sequence[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation, so every row's next token is at the same position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
