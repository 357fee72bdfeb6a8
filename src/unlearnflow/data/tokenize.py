"""QA tokenisation with answer-only labels, and the padding collators.

A QA pair becomes ``[bos] prompt answer eos`` where the prompt is ``format_prompt(question)``, or
the tokenizer's chat template for instruction-tuned checkpoints (``PromptFormat``).
Prompt and answer are tokenised separately and concatenated, so the answer's tokens do not
depend on the prompt (a BPE merge across the boundary would make "the answer" ambiguous).
Labels are the input ids on answer (and EOS) positions and ``IGNORE_INDEX`` everywhere else; the
model shifts them itself, so the loss falls on predicting answer tokens only.

Plain text (raw corpora, MUSE privleak texts, a verbmem continuation) gets no EOS, as
open-unlearning's ``preprocess_pretraining_instance`` (src/data/utils.py) encodes it: the text
does not end there, it was cut from a longer document. A target cut by ``max_length`` is counted
(``Truncations``) and reported as one warning per split, never silently.

torch is imported by the collators only: tokenising, and the stages that import this module for
their argument checks, do not pay for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unlearnflow.errors import DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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

    def few_shot_prompt_ids(
        self,
        tokenizer: Any,
        question: str,
        examples: Sequence[Mapping[str, str]] = (),
        *,
        context: str = "",
    ) -> list[int]:
        """A few-shot generation prompt, as open-unlearning builds MUSE knowmem's
        (``QADataset`` with ``few_shot_dataset_hf_args`` → ``preprocess_chat_instance``).

        ``chat=True``: each example is a user turn and an assistant turn, then the question's user
        turn and the generation prompt. Plain: each example as ``template`` + " " + answer +
        "\n\n", then ``template`` + " ": with the default template that is the reference's
        non-chat tags of its MUSE models (``Question: `` / ``\n`` / ``Answer: `` / ``\n\n``,
        configs/model/Llama-2-7b-hf.yaml), so the prompt ends with ``"Answer: "`` exactly as the
        reference's does. ``context`` is a literal prefix (a knowmem row's ready-made ``context``)
        put before the examples (in the user turn with ``chat=True``). The prompt is never
        truncated: cutting it would drop its examples (the reference's chat path does not cut it).
        """
        if self.chat:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for e in examples:
                messages += [
                    {"role": "user", "content": e["question"]},
                    {"role": "assistant", "content": e["answer"]},
                ]
            messages.append({"role": "user", "content": context + question})
            return self._render(tokenizer, messages, generation_prompt=True)
        shots = "".join(f"{format_prompt(e['question'], self.template)} {e['answer']}\n\n" for e in examples)
        text = context + shots + format_prompt(question, self.template) + " "
        return encode_prompt_text(tokenizer, text)

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


@dataclass
class Truncations:
    """Targets cut to fit a token cap while one split is encoded: one warning per split, with counts.

    ``record`` is called by the encoders for every target; ``warn`` logs
    "split X: N of M targets cut to max_length=L (longest T tokens)" when any was cut, where T is
    the longest uncut length in the unit L caps (prompt + target, or the target alone for a
    ``target_max_length`` cap): the cap that would have kept every target whole.
    """

    total: int = 0
    cut: int = 0
    cap: int = 0
    longest: int = 0

    def record(self, length: int, cap: int) -> None:
        """One target whose uncut length (in the cap's unit) is ``length``, under cap ``cap``."""
        self.total += 1
        self.longest = max(self.longest, length)
        if length > cap:
            self.cut += 1
            self.cap = cap

    def warn(self, split: str) -> None:
        """Log the one warning of ``split`` if any of its targets was cut."""
        if self.cut:
            log.warning(
                "split %s: %d of %d targets cut to max_length=%d (longest %d tokens)",
                split,
                self.cut,
                self.total,
                self.cap,
                self.longest,
            )


def _with_bos(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else list(ids)


def encode_example(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    max_length: int | None = None,
    target_max_length: int | None = None,
    add_eos: bool = True,
    cuts: Truncations | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels of a (prompt, target) pair; the loss falls on the target only.

    Prompt and target are tokenised separately, so the target's tokens never depend on the
    prompt. ``[bos] prompt target [eos]``: labels are ``IGNORE_INDEX`` on BOS and prompt.

    Args:
        tokenizer: a Hugging Face tokenizer (``eos_token_id`` required, ``bos_token_id`` optional).
        prompt: the conditioning text, already formatted ("" for plain text).
        target: the scored text, with its leading space if it follows the prompt.
        max_length: total length cap; the target is truncated from its end, never the prompt.
        target_max_length: instead, a cap on the target alone, the prompt kept whole: the
            ``max_length`` of open-unlearning's ``CompletionDataset`` ("maximum text content
            length", 2048 for MUSE's privleak and verbmem sets). Exactly one of the two is given.
        add_eos: append EOS to the target (not for plain text or a multiple-choice letter).
        cuts: counts a truncated target (see ``Truncations``).

    Raises:
        ValueError: the prompt alone fills ``max_length``.
    """
    if (max_length is None) == (target_max_length is None):
        raise ValueError("give exactly one of max_length and target_max_length")
    prompt_ids = _with_bos(
        tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    )
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if add_eos:
        target_ids.append(tokenizer.eos_token_id)
    if max_length is None:
        assert target_max_length is not None
        if cuts is not None:
            cuts.record(len(target_ids), target_max_length)
        target_ids = target_ids[:target_max_length]
        return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}
    return _join(prompt_ids, target_ids, max_length, cuts)


def encode_qa(
    tokenizer: Any,
    question: str,
    answer: str,
    *,
    max_length: int,
    fmt: PromptFormat = PLAIN,
    cuts: Truncations | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels of a QA pair in prompt format ``fmt``; the loss falls on the answer (and
    EOS) only, which is truncated from its end to fit ``max_length``, never the prompt.

    Raises:
        ValueError: the prompt alone fills ``max_length``.
    """
    prompt_ids, answer_ids = fmt.pair_ids(tokenizer, question, answer)
    return _join(prompt_ids, answer_ids, max_length, cuts)


def _join(
    prompt_ids: list[int], target_ids: list[int], max_length: int, cuts: Truncations | None = None
) -> dict[str, list[int]]:
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(
            f"prompt of {len(prompt_ids)} tokens leaves no room for the answer (max_length={max_length})"
        )
    if cuts is not None:
        cuts.record(len(prompt_ids) + len(target_ids), max_length)
    target_ids = target_ids[:room]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def encode_text_windows(tokenizer: Any, text: str, *, max_length: int) -> list[dict[str, list[int]]]:
    """A document as consecutive training windows of at most ``max_length`` tokens.

    Each window is ``[bos] tokens`` with the loss on every token after BOS, and no EOS: the
    reference trains on raw corpora without one (open-unlearning's ``PretrainingDataset``). Long
    documents (MUSE books, WMDP corpora) are thus trained on whole, not cut at the first
    ``max_length`` tokens, so nothing is truncated here.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
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
    import torch

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
    import torch

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


def completion_target(gt: str) -> str:
    """The scored text of a completion row: its continuation after one space.

    open-unlearning tokenises ``prompt + " " + gt`` (``CompletionDataset(insert_space=True)``, MUSE
    verbmem); tokenising ``" " + gt`` apart from the prompt keeps that space at the boundary, as
    ``" " + answer`` does for QA, instead of gluing the continuation's first word to the prompt's
    last one.
    """
    return " " + gt


def training_examples(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    kind: str,
    *,
    max_length: int,
    fmt: PromptFormat = PLAIN,
    split: str = "train",
) -> list[dict[str, list[int]]]:
    """Encoded training examples of one split, by its kind (see ``data.benchmark``).

    Question/answer kinds train on the answer given the prompt; ``text`` on every token of each
    document (in ``max_length`` windows, no EOS); ``completion`` on the continuation given its
    prefix (no EOS: plain text); ``mcq`` on the correct letter after the lettered prompt. ``fmt``
    applies to question/answer kinds (the chat template of instruction-tuned checkpoints); corpora
    and lettered prompts stay plain. Targets cut to ``max_length`` are one warning naming ``split``.
    """
    cuts = Truncations()
    if kind in ("qa", "options", "knowmem"):
        out = [
            encode_qa(tokenizer, r["question"], r["answer"], max_length=max_length, fmt=fmt, cuts=cuts)
            for r in rows
        ]
    elif kind == "text":
        out = [w for r in rows for w in encode_text_windows(tokenizer, r["text"], max_length=max_length)]
    elif kind == "completion":
        out = [
            encode_example(
                tokenizer,
                r["prompt"],
                completion_target(r["gt"]),
                max_length=max_length,
                add_eos=False,
                cuts=cuts,
            )
            for r in rows
        ]
    elif kind == "mcq":
        out = [
            encode_example(
                tokenizer,
                format_mcq(r["question"], r["choices"]),
                " " + MCQ_LETTERS[r["answer"]],
                max_length=max_length,
                cuts=cuts,
            )
            for r in rows
        ]
    else:
        raise ValueError(f"unknown split kind {kind!r}")
    cuts.warn(split)
    return out
