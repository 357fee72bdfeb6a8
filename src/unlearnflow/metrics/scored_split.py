"""One split of one model run through the model once: ``score_split`` -> ``ScoredSplit``.

A split is scored by ONE ``score_examples`` call over every target its metrics need (the answer,
the paraphrased and perturbed answers, the multiple-choice options — all batched together) and,
if a generation metric is requested, ONE ``generate_greedy`` call. ``SuiteOptions`` says how
(batch size, token caps, generation lengths, prompt format). The metrics that read a
``ScoredSplit`` are in ``split_metrics``; the suite that scores every split of a benchmark is
``suite``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from unlearnflow.data.tokenize import (
    IGNORE_INDEX,
    MCQ_LETTERS,
    PLAIN,
    PromptFormat,
    Truncations,
    completion_target,
    encode_example,
    encode_prompt,
    encode_prompt_text,
    encode_qa,
    format_mcq,
    format_prompt,
)
from unlearnflow.errors import DataError
from unlearnflow.metrics import mia
from unlearnflow.metrics.scoring import (
    TokenStats,
    generate_greedy,
    greedy_from_scored,
    plain_greedy,
    score_examples,
)

log = logging.getLogger(__name__)

KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")  # MUSE knowmem's stop words (open-unlearning)


@dataclass(frozen=True)
class SuiteOptions:
    """How the suite runs (the ``evaluate`` params section plus the model's token cap)."""

    batch_size: int = 64
    max_length: int = 512
    max_new_tokens: int | None = None  # None: the benchmark's ``Layout.max_new_tokens``
    knowmem_max_new_tokens: int = 32
    verbmem_max_new_tokens: int = 128
    text_max_length: int = 2048  # text / completion targets: the reference's CompletionDataset cap
    min_k_fraction: float = mia.MIN_K_FRACTION
    grad_norm_p: float = 2.0
    mcq_format: str = "letter"
    max_samples: int | None = None
    seed: int = 0
    prompt: PromptFormat = PLAIN
    definitions: str = "reference"  # evaluate.definitions: "reference" (open-unlearning's) | "unlearnflow"
    # split -> row indices left out (a relearning attack's training pool: never evaluated on)
    exclude: Mapping[str, frozenset[int]] = field(default_factory=dict)


@dataclass
class ScoredSplit:
    """Everything the metrics read about one split of one model.

    Attributes:
        name, kind, role: the split and its ``SplitInfo``.
        rows: the (possibly subsampled) split rows; ``indices`` their positions in the full split.
        target: ``TokenStats`` of each row's main target (answer, text, continuation), or None.
        target_examples: the main target's encoded examples (reused by ``mia_grad_norm``), or None.
        target_texts: the main target's text (zlib size), or None.
        nll_paraphrase: (N,) avgNLL of ``paraphrased_answer`` (qa), or None.
        nll_perturbed: (N, K) avgNLL of the K ``perturbed_answer`` entries, or None.
        option_logprob: (N, C) summed log-probability of each choice (mcq), or None.
        generations: N greedy outputs, or None.
        mia_scores: MIA name -> (N,) member-likeness scores (filled by the suite).
        definitions: ``SuiteOptions.definitions``, passed to the metric maths.
    """

    name: str
    kind: str
    role: str
    rows: Sequence[Mapping[str, Any]]
    indices: np.ndarray
    target: list[TokenStats] | None = None
    target_examples: list[dict] | None = None
    target_texts: list[str] | None = None
    nll_paraphrase: np.ndarray | None = None
    nll_perturbed: np.ndarray | None = None
    option_logprob: np.ndarray | None = None
    generations: list[str] | None = None
    mia_scores: dict[str, np.ndarray] = field(default_factory=dict)
    definitions: str = "reference"

    @property
    def nll_answer(self) -> np.ndarray:
        assert self.target is not None
        return np.array([t.avg_nll for t in self.target], dtype=np.float64)


class MemoTokenizer:
    """A tokenizer whose plain calls ``tokenizer(text, **kwargs)`` are memoised, for encoding one split.

    Every variant of a row (its answer, paraphrase, perturbed answers, and the generation prompt)
    encodes the same question prompt: this tokenises it once instead of up to eight times. Inside
    ``recording()``, texts not yet known are only noted (and answered with a one-token stand-in);
    on leaving the block they are tokenised in one batched call, which a fast tokenizer runs several
    times quicker than one call per text, with the same ids. A call returns a fresh
    ``{"input_ids": [...]}``, all the ``data.tokenize`` encoders read; anything else (special-token
    ids, the chat template, ``decode``) is the wrapped tokenizer's own.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: dict[tuple[Any, ...], list[int]] = {}
        # read once: a Hugging Face tokenizer looks special-token ids up again on every access
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self._noted: dict[tuple[Any, ...], dict[str, None]] | None = None  # kwargs -> texts, while recording

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        if not isinstance(text, str):
            return self._tokenizer(text, **kwargs)
        options = tuple(sorted(kwargs.items()))
        ids = self._ids.get((text, *options))
        if ids is None:
            if self._noted is not None:
                self._noted.setdefault(options, {})[text] = None
                return {"input_ids": [0]}
            ids = self._ids[(text, *options)] = list(self._tokenizer(text, **kwargs)["input_ids"])
        return {"input_ids": list(ids)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Note the texts called for in the block (results are stand-ins: discard them), then
        tokenise them all at once."""
        self._noted = {}
        try:
            yield
            for options, texts in self._noted.items():
                batch = list(texts)
                for text, ids in zip(
                    batch, self._tokenizer(batch, **dict(options))["input_ids"], strict=True
                ):
                    self._ids[(text, *options)] = list(ids)
        finally:
            self._noted = None


def _target(
    kind: str, row: Mapping[str, Any], opts: SuiteOptions, tok: Any, cuts: Truncations | None = None
) -> tuple[dict, str]:
    """The encoded main target of a row and its text.

    Plain text (``text``: MUSE privleak / MIA texts; ``completion``: a verbmem continuation after
    its whole prefix and one space) is encoded as open-unlearning's ``CompletionDataset``: no EOS,
    at most ``opts.text_max_length`` target tokens (2048, configs/data/datasets/MUSE_MIA.yaml and
    MUSE_forget_verbmem.yaml), not ``model.max_length``. QA answers keep the prompt format and
    ``opts.max_length``.
    """
    if kind == "text":
        enc = encode_example(
            tok, "", row["text"], target_max_length=opts.text_max_length, add_eos=False, cuts=cuts
        )
        return enc, row["text"]
    if kind == "completion":
        target = completion_target(row["gt"])
        enc = encode_example(
            tok, row["prompt"], target, target_max_length=opts.text_max_length, add_eos=False, cuts=cuts
        )
        return enc, row["gt"]
    enc = encode_qa(
        tok, row["question"], row["answer"], max_length=opts.max_length, fmt=opts.prompt, cuts=cuts
    )
    return enc, row["answer"]


def _options(
    row: Mapping[str, Any], tok: Any, opts: SuiteOptions, cuts: Truncations | None = None
) -> list[dict]:
    """Encoded choices of an mcq row: the letters after the lettered prompt, or each choice's text."""
    if opts.mcq_format == "letter":
        prompt = format_mcq(row["question"], row["choices"])
        targets = [" " + MCQ_LETTERS[i] for i in range(len(row["choices"]))]
    else:
        prompt = format_prompt(row["question"])
        targets = [" " + c for c in row["choices"]]
    return [
        encode_example(tok, prompt, t, max_length=opts.max_length, add_eos=False, cuts=cuts) for t in targets
    ]


def _generation_prompts(kind: str, rows: Sequence[Mapping[str, Any]], tok: Any, opts: SuiteOptions) -> list:
    """Prompt ids to generate from. None is cut to ``max_length``, as in the reference: a verbmem
    prefix is given whole (``CompletionDataset``), and a knowmem prompt keeps every few-shot example
    and ends as the reference's (``PromptFormat.few_shot_prompt_ids``)."""
    if kind == "completion":
        return [encode_prompt_text(tok, r["prompt"]) for r in rows]
    if kind == "knowmem":
        return [
            opts.prompt.few_shot_prompt_ids(
                tok, r["question"], r.get("few_shot") or (), context=r.get("context") or ""
            )
            for r in rows
        ]
    return [encode_prompt(tok, r["question"], fmt=opts.prompt) for r in rows]


@dataclass
class _Encoded:
    """A split's encoded inputs: ``examples`` in ``score_split``'s order (target, paraphrase, then
    each row's perturbed answers or options) with the row each belongs to, the main target's
    examples and texts, and the generation prompts (each None when not needed)."""

    examples: list[dict]
    owners: list[int] = field(default_factory=list)  # the row of each example
    target_examples: list[dict] | None = None
    target_texts: list[str] | None = None
    prompts: list[list[int]] | None = None


def _encode(
    name: str,
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    needs: frozenset[str],
    opts: SuiteOptions,
    tok: Any,
    cuts: Truncations,
) -> _Encoded:
    """Every example ``needs`` asks for of a split's rows, and its generation prompts."""
    enc = _Encoded(examples=[])
    n = len(rows)
    if "target" in needs:
        encoded = [_target(kind, r, opts, tok, cuts) for r in rows]
        enc.target_examples = [e for e, _ in encoded]
        enc.examples += enc.target_examples
        enc.owners += range(n)
        enc.target_texts = [t for _, t in encoded]
    if "paraphrase" in needs:
        enc.examples += [
            encode_qa(
                tok,
                r["question"],
                r["paraphrased_answer"],
                max_length=opts.max_length,
                fmt=opts.prompt,
                cuts=cuts,
            )
            for r in rows
        ]
        enc.owners += range(n)
    if "perturbed" in needs:
        widths = {len(r["perturbed_answer"]) for r in rows}
        if len(widths) != 1 or 0 in widths:
            raise DataError(
                f"split {name!r}: every row needs the same number (>= 1) of perturbed_answer; got {widths}"
            )
        enc.examples += [
            encode_qa(tok, r["question"], a, max_length=opts.max_length, fmt=opts.prompt, cuts=cuts)
            for r in rows
            for a in r["perturbed_answer"]
        ]
        enc.owners += [i for i, r in enumerate(rows) for _ in r["perturbed_answer"]]
    if "options" in needs:
        n_choices = {len(r["choices"]) for r in rows}
        if len(n_choices) != 1:
            raise DataError(f"split {name!r}: rows have different numbers of choices {sorted(n_choices)}")
        enc.examples += [e for r in rows for e in _options(r, tok, opts, cuts)]
        enc.owners += [i for i, r in enumerate(rows) for _ in r["choices"]]
    if "generation" in needs:
        enc.prompts = _generation_prompts(kind, rows, tok, opts)
    return enc


def score_split(
    model: torch.nn.Module,
    tok: Any,
    name: str,
    kind: str,
    role: str,
    rows: Sequence[Mapping[str, Any]],
    indices: np.ndarray,
    *,
    needs: frozenset[str],
    opts: SuiteOptions,
    device: torch.device | str,
) -> ScoredSplit:
    """Run the model once over a split: one ``score_examples`` call for every needed target and,
    if ``generation`` is needed, one ``generate_greedy`` call.

    The rows are encoded twice: a first pass only notes the texts to tokenise, which are then
    tokenised in one batch (``MemoTokenizer``). Generation decodes only the answers the scoring
    pass does not already show (``_known_generations``), unless the model's generation config
    makes ``generate`` pick other than the argmax (``scoring.plain_greedy``).

    Args:
        needs: subset of {``target``, ``vocab``, ``paraphrase``, ``perturbed``, ``options``,
            ``generation``, ``grad``}.
    """
    n = len(rows)
    memo = MemoTokenizer(tok)
    with memo.recording():  # a first pass notes every text, tokenised then in one batch
        _encode(name, kind, rows, needs, opts, memo, Truncations())
    cuts = Truncations()  # every target of the split cut to a cap: one warning, after encoding
    enc = _encode(name, kind, rows, needs, opts, memo, cuts)
    cuts.warn(name)
    examples = enc.examples
    s = ScoredSplit(
        name=name,
        kind=kind,
        role=role,
        rows=rows,
        indices=indices,
        target_examples=enc.target_examples,
        target_texts=enc.target_texts,
        definitions=opts.definitions,
    )
    stats = score_examples(
        model,
        examples,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        batch_size=opts.batch_size,
        device=device,
        vocab_stats="vocab" in needs,
        desc=f"score {name}",
    )
    offset = 0

    def take(count: int) -> list[TokenStats]:
        nonlocal offset
        part = stats[offset : offset + count]
        offset += count
        return part

    if "target" in needs:
        s.target = take(n)
    if "paraphrase" in needs:
        s.nll_paraphrase = np.array([t.avg_nll for t in take(n)])
    if "perturbed" in needs:
        k = len(rows[0]["perturbed_answer"])
        s.nll_perturbed = np.array([t.avg_nll for t in take(n * k)]).reshape(n, k)  # row i's K are adjacent
    if "options" in needs:
        c = len(rows[0]["choices"])
        s.option_logprob = np.array([float(t.logprobs.sum()) for t in take(n * c)]).reshape(n, c)
    if "generation" in needs:
        if opts.max_new_tokens is None:
            raise ValueError(
                "SuiteOptions.max_new_tokens is unresolved (evaluate_splits sets the benchmark's)"
            )
        cap = {"knowmem": opts.knowmem_max_new_tokens, "completion": opts.verbmem_max_new_tokens}.get(
            kind, opts.max_new_tokens
        )
        known = _known_generations(enc, stats, tok.eos_token_id, cap) if plain_greedy(model) else []
        read = len(known) - known.count(None)
        log.debug("%s: %d of %d greedy answers read off the scoring pass", name, read, n)
        s.generations = generate_greedy(
            model,
            tok,
            enc.prompts,
            max_new_tokens=cap,
            batch_size=opts.batch_size,
            device=device,
            stop_strings=KNOWMEM_STOPS if kind == "knowmem" else (),
            **({"known": known} if read else {}),
        )
    return s


def _known_generations(
    enc: _Encoded, stats: Sequence[TokenStats], eos_token_id: int | None, cap: int
) -> list[list[int] | None]:
    """Each row's greedy answer where one of its scored targets already shows it
    (``scoring.greedy_from_scored``): a target scored right after the very prompt generation starts
    from (a qa or options row's question), whose every token up to EOS is the argmax prediction."""
    assert enc.prompts is not None
    known: list[list[int] | None] = [None] * len(enc.prompts)
    if eos_token_id is None:
        return known
    for example, st, row in zip(enc.examples, stats, enc.owners, strict=True):
        prompt = enc.prompts[row]
        start = len(prompt)
        target = example["input_ids"][start:]
        if (
            known[row] is not None
            or example["input_ids"][:start] != prompt
            or any(label == IGNORE_INDEX for label in example["labels"][start:])
            or any(label != IGNORE_INDEX for label in example["labels"][:start])
            or len(target) != len(st.correct)
        ):
            continue
        known[row] = greedy_from_scored(target, st.correct, eos_token_id=eos_token_id, max_new_tokens=cap)
    return known
