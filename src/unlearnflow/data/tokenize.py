"""QA tokenisation with answer-only labels, and the padding collators.

A QA pair becomes ``[bos] prompt answer eos`` where the prompt is ``format_prompt(question)``, or
the tokenizer's chat template for instruction-tuned checkpoints (``PromptFormat``).
Prompt and answer are tokenised separately and concatenated, so the answer's tokens do not
depend on the prompt (a BPE merge across the boundary would make "the answer" ambiguous).
Labels are the input ids on answer (and EOS) positions and ``IGNORE_INDEX`` everywhere else; the
model shifts them itself, so the loss falls on predicting answer tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unlearnflow.errors import DataError

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The text the model is conditioned on; the answer follows after one space."""
    return template.format(question=question)


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the model's prompt.

    ``chat=False``: the plain ``template`` ("Question: …\nAnswer:") with the answer after one space
    (the embedded models, base models). ``chat=True``: the tokenizer's own chat template, as
    open-unlearning renders TOFU for instruction-tuned checkpoints: the prompt is the user turn
    (after an optional system prompt) with the generation prompt, the target is what the template
    puts after it for the assistant's answer (its end-of-turn token included), plus EOS if the
    template does not end with it.
    """

    chat: bool = False
    system_prompt: str | None = None
    date_string: str | None = None
    template: str = PROMPT_TEMPLATE

    def _messages(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _render(self, tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("model.chat_template is set but the tokenizer has no chat template")
        extra = {"date_string": self.date_string} if self.date_string else {}
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False, **extra
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def prompt_ids(self, tokenizer: Any, question: str) -> list[int]:
        """The prompt's token ids, BOS included where the model uses one."""
        if not self.chat:
            return encode_prompt_text(tokenizer, format_prompt(question, self.template))
        return self._render(tokenizer, self._messages(question), generation_prompt=True)

    def pair_ids(self, tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, target ids)`` of a question and its answer; the target ends with EOS."""
        if not self.chat:
            target = [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            return self.prompt_ids(tokenizer, question), target
        prompt = self.prompt_ids(tokenizer, question)
        full = self._render(tokenizer, self._messages(question, answer), generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise DataError("the chat template renders the prompt differently with and without the answer")
        target = full[len(prompt) :]
        if not target or target[-1] != tokenizer.eos_token_id:
            target.append(tokenizer.eos_token_id)
        return prompt, target


PLAIN = PromptFormat()


def _with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else list(ids)


def encode_example(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    max_length: int,
    add_eos: bool = True,
    prompt_budget: int | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels of a (prompt, target) pair; the loss falls on the target only.

    Prompt and target are tokenised separately, so the target's tokens never depend on the
    prompt. ``[bos] prompt target [eos]``: labels are ``IGNORE_INDEX`` on BOS and prompt.

    Args:
        tokenizer: a Hugging Face tokenizer (``eos_token_id`` required, ``bos_token_id`` optional).
        prompt: the conditioning text, already formatted ("" for plain text).
        target: the scored text, with its leading space if it follows the prompt.
        max_length: total length cap; the target is truncated from its end, never the prompt.
        add_eos: append EOS to the target (not for a multiple-choice letter).
        prompt_budget: keep only the prompt's last this-many tokens (a long passage prefix).

    Raises:
        ValueError: the prompt alone fills ``max_length``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if prompt_budget is not None:
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - prompt_budget) :]
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if add_eos:
        target_ids.append(tokenizer.eos_token_id)
    return _join(_with_bos(tokenizer, prompt_ids), target_ids, max_length)


def encode_qa(
    tokenizer: Any, question: str, answer: str, *, max_length: int, fmt: PromptFormat = PLAIN
) -> dict[str, list[int]]:
    """Token ids and labels of a QA pair in prompt format ``fmt``; the loss falls on the answer (and
    EOS) only, which is truncated from its end to fit ``max_length``, never the prompt.

    Raises:
        ValueError: the prompt alone fills ``max_length``.
    """
    prompt_ids, answer_ids = fmt.pair_ids(tokenizer, question, answer)
    return _join(prompt_ids, answer_ids, max_length)


def _join(prompt_ids: list[int], target_ids: list[int], max_length: int) -> dict[str, list[int]]:
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for the answer (max_length={max_length})"
        )
    target_ids = target_ids[:room]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def encode_text_windows(tokenizer: Any, text: str, *, max_length: int) -> list[dict[str, list[int]]]:
    """A document as consecutive training windows of at most ``max_length`` tokens.

    Each window is ``[bos] tokens`` with the loss on every token after BOS; the document's last
    window ends with EOS. Long documents (MUSE books, WMDP corpora) are thus trained on whole,
    not cut at the first ``max_length`` tokens.
    """
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(bos)
    if step < 1:
        raise DataError(f"max_length={max_length} leaves no room for text")
    windows = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        windows.append({"input_ids": bos + chunk, "labels": [IGNORE_INDEX] * len(bos) + chunk})
    return windows


def encode_prompt(tokenizer: Any, question: str, *, fmt: PromptFormat = PLAIN) -> list[int]:
    """Prompt ids for generation: the same tokens ``encode_qa`` puts before the answer."""
    return fmt.prompt_ids(tokenizer, question)


def encode_prompt_text(tokenizer: Any, prompt: str, *, max_length: int | None = None) -> list[int]:
    """``[bos] prompt`` ids for generation; with ``max_length``, the prompt keeps its last tokens."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = _with_bos(tokenizer, [])
    if max_length is not None and len(bos) + len(ids) > max_length:
        ids = ids[len(bos) + len(ids) - max_length :]
    return bos + ids


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


MCQ_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_mcq(question: str, choices: Sequence[str]) -> str:
    """The multiple-choice prompt of lm-evaluation-harness's MMLU / WMDP tasks (letters after it)."""
    lines = [question.strip(), *(f"{MCQ_LETTERS[i]}. {c}" for i, c in enumerate(choices)), "Answer:"]
    return "\n".join(lines)


def training_examples(
    tokenizer: Any, rows: Sequence[dict[str, Any]], kind: str, *, max_length: int, fmt: PromptFormat = PLAIN
) -> list[dict[str, list[int]]]:
    """Encoded training examples of one split, by its kind (see ``data.benchmark``).

    Question/answer kinds train on the answer given the prompt; ``text`` on every token of each
    document (in ``max_length`` windows); ``completion`` on the continuation given its prefix;
    ``mcq`` on the correct letter after the lettered prompt. ``fmt`` applies to question/answer
    kinds (the chat template of instruction-tuned checkpoints); corpora and lettered prompts stay plain.
    """
    if kind in ("qa", "options", "knowmem"):
        return [
            encode_qa(tokenizer, r["question"], r["answer"], max_length=max_length, fmt=fmt) for r in rows
        ]
    if kind == "text":
        return [w for r in rows for w in encode_text_windows(tokenizer, r["text"], max_length=max_length)]
    if kind == "completion":
        return [encode_example(tokenizer, r["prompt"], r["gt"], max_length=max_length) for r in rows]
    if kind == "mcq":
        return [
            encode_example(
                tokenizer,
                format_mcq(r["question"], r["choices"]),
                " " + MCQ_LETTERS[r["answer"]],
                max_length=max_length,
            )
            for r in rows
        ]
    raise ValueError(f"unknown split kind {kind!r}")
