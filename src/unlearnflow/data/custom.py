"""A user's own forget request: the everyday case of unlearning a deployed model.

An engineer must make a model forget a privacy request or a copyrighted text. They supply JSONL
(or JSON list) files: ``benchmark.custom.forget`` (what must go), ``.retain`` (what must stay) and
optionally ``.holdout`` (similar data the model never saw, the non-members of the membership
attacks). Each file holds either question-answer pairs (``question``/``answer`` or
``prompt``/``response``) or plain text (``text``, or one JSON string per line; a ``.txt`` file is
one passage); the format is detected per file and must be the same on every row.

Mistakes in such files are common and silent mistakes are costly (a fact that is both forgotten
and retained makes every number meaningless), so the files are checked strictly: missing or
empty files, malformed lines, wrong columns, empty strings, forget rows repeated in retain, and
holdout rows that are in forget or retain are one-line errors naming the file and the row.

A QA row may mark the sensitive part of its answer with ``secret`` (a string or a list of
strings, each occurring in the answer, compared as ``span_words``: ignoring case, spacing and
punctuation). It is kept on the row, so the evaluator's per-fact leak check
(``metrics.facts``) asks whether the model still generates that span rather than most of the
answer's words.

Splits: ``forget`` (qa or text, forget), ``retain`` (utility), ``holdout`` (mia, when given). A
plain-text forget set also gets ``verbmem_forget`` (completion, forget): each passage longer than
``verbmem_prefix_words`` words is cut into a prompt of that many words and the true continuation
of up to ``verbmem_continuation_words`` words, so that verbatim regurgitation is measured too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearnflow.config import BenchmarkConfig, CustomConfig
from unlearnflow.data.benchmark import Benchmark, SplitInfo
from unlearnflow.data.sources import QA_ALIASES, qa_rows, read_file
from unlearnflow.errors import UnlearnflowError

logger = logging.getLogger(__name__)

_EXAMPLE_CHARS = 60
SECRET = "secret"  # the QA-row column marking the sensitive part of an answer
# A word: a run of letters and digits (any script); everything else separates words.
WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class CustomFile:
    """One checked custom file: its split name, path, rows and kind (``"qa"`` or ``"text"``)."""

    name: str
    path: Path
    rows: list[dict[str, Any]]
    kind: str


def load(cfg: BenchmarkConfig) -> Benchmark:
    """Read and check the custom forget / retain / holdout files into a ``Benchmark``.

    Raises:
        UnlearnflowError: a file problem (see the module docstring), one line naming the file.
    """
    c = cfg.custom
    assert c.forget is not None and c.retain is not None  # guaranteed by BenchmarkConfig's validator
    forget = read_custom_file("forget", c.forget)
    retain = read_custom_file("retain", c.retain)
    _check_disjoint(forget, retain, "a model cannot both forget and keep them")
    files = [forget, retain]
    if c.holdout is not None:
        holdout = read_custom_file("holdout", c.holdout)
        if holdout.kind != forget.kind:
            raise UnlearnflowError(
                f"{holdout.path}: holdout rows are {holdout.kind} but forget rows ({forget.path}) are "
                f"{forget.kind}; membership inference must compare like with like"
            )
        for other in (forget, retain):
            _check_disjoint(holdout, other, "holdout rows must be data the model never saw")
        files.append(holdout)

    roles = {"forget": "forget", "retain": "utility", "holdout": "mia"}
    splits = {f.name: f.rows for f in files}
    info = {f.name: SplitInfo(f.kind, roles[f.name]) for f in files}
    if forget.kind == "text":
        verbmem = verbmem_rows([r["text"] for r in forget.rows], c)
        if verbmem:
            splits["verbmem_forget"] = verbmem
            info["verbmem_forget"] = SplitInfo("completion", "forget")
        else:
            logger.warning(
                "custom: no forget passage of %s has more than %d words; no verbmem_forget split",
                forget.path,
                c.verbmem_prefix_words,
            )
    return Benchmark(
        splits=splits,
        info=info,
        train={"target": ["forget", "retain"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=("forget", "holdout") if "holdout" in splits else None,
        forget_quality=None,
        meta={
            "benchmark": "custom",
            "files": {f.name: str(f.path) for f in files},
            "kinds": {n: i.kind for n, i in info.items()},
            "counts": {n: len(r) for n, r in splits.items()},
        },
    )


def read_custom_file(name: str, path: str | Path) -> CustomFile:
    """Read and check one custom file, the rows of split ``name``; its kind is ``"qa"`` or ``"text"``.

    QA rows keep ``question``/``answer`` (and the optional truth-ratio columns, when a user has
    them) and ``secret`` as a list of spans (a single string becomes a one-element list); text rows
    keep ``text``. Other columns are dropped.

    Raises:
        UnlearnflowError: missing or empty file, malformed JSON, unrecognised or mixed columns,
            empty or non-string values, a secret that is not in its answer or is on a text row.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise UnlearnflowError(f"custom data file {what}: {path}")
    rows = read_file(path)
    if not rows:
        raise UnlearnflowError(f"{path}: the file holds no rows")
    kind = _row_kind(rows[0])
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        row_kind = _row_kind(row)
        if row_kind is None:
            raise UnlearnflowError(
                f"{where}: unrecognised columns {', '.join(sorted(row)) or 'none'}; expected question/answer, "
                "prompt/response, or text (or a JSON string per line)"
            )
        if row_kind != kind:
            raise UnlearnflowError(
                f"{where}: a {row_kind} row, but the file's first row is {kind}; use one format per file"
            )
    if kind == "qa":
        secrets = [r.get(SECRET) for r in rows]  # qa_rows keeps the row order and drops other columns
        rows = qa_rows(rows, str(path))
        columns = ("question", "answer")
    else:
        marked = next((i for i, r in enumerate(rows) if SECRET in r), None)
        if marked is not None:
            raise UnlearnflowError(
                f"{path} row {marked + 1}: {SECRET!r} marks part of an answer, but this file holds "
                "plain text; mark secrets on question/answer rows"
            )
        rows = [{"text": r["text"]} for r in rows]
        columns = ("text",)
    for i, row in enumerate(rows):
        for col in columns:
            value = row.get(col)
            if value is None:
                raise UnlearnflowError(f"{path} row {i + 1}: {col!r} is null")
            if not isinstance(value, str):
                raise UnlearnflowError(
                    f"{path} row {i + 1}: {col!r} must be a string, got {type(value).__name__}"
                )
            if not value.strip():
                raise UnlearnflowError(f"{path} row {i + 1}: {col!r} is empty")
    if kind == "qa":
        for i, (row, secret) in enumerate(zip(rows, secrets, strict=True)):
            if secret is not None:
                row[SECRET] = _checked_secret(secret, row["answer"], f"{path} row {i + 1}")
    return CustomFile(name, path, rows, kind)


def verbmem_rows(passages: list[str], cfg: CustomConfig) -> list[dict[str, str]]:
    """Verbatim-memorisation probes: the first ``verbmem_prefix_words`` words of each passage as
    the prompt, the next (up to) ``verbmem_continuation_words`` as the ground truth.

    Words are whitespace-separated and re-joined by single spaces, so line breaks in a passage do
    not leak into the prompt. Passages with no word beyond the prefix give no probe.
    """
    out = []
    for text in passages:
        words = text.split()
        if len(words) > cfg.verbmem_prefix_words:
            prefix = cfg.verbmem_prefix_words
            out.append(
                {
                    "prompt": " ".join(words[:prefix]),
                    "gt": " ".join(words[prefix : prefix + cfg.verbmem_continuation_words]),
                }
            )
    return out


def span_words(text: str) -> list[str]:
    """The lower-cased words of ``text``: how secrets are compared with answers and generations,
    so that case, spacing and punctuation never decide a match ("42, Larchmere-Lane" = "42 larchmere lane")."""
    return WORD.findall(text.lower())


def find_span(span: Sequence[str], words: Sequence[str]) -> int | None:
    """Where the word sequence ``span`` first occurs, as whole words, in ``words``; None if nowhere
    (or ``span`` is empty)."""
    n = len(span)
    if n == 0:
        return None
    return next((i for i in range(len(words) - n + 1) if list(words[i : i + n]) == list(span)), None)


def secret_spans(value: Any, where: str) -> list[str]:
    """A row's ``secret`` value as a list of spans: None -> [], a string -> [it], a list kept.

    Raises:
        UnlearnflowError: not a string or a list of strings, or a span without a letter or digit
            (it could never be matched), naming ``where``.
    """
    if value is None:
        return []
    spans = [value] if isinstance(value, str) else value
    if not isinstance(spans, list) or not spans or not all(isinstance(s, str) for s in spans):
        raise UnlearnflowError(
            f"{where}: {SECRET!r} must be a string or a non-empty list of strings, got {value!r}"
        )
    empty = [s for s in spans if not span_words(s)]
    if empty:
        raise UnlearnflowError(f"{where}: {SECRET!r} {empty[0]!r} has no word to match")
    return list(spans)


def _checked_secret(value: Any, answer: str, where: str) -> list[str]:
    """``secret_spans``, each of which must occur in ``answer`` (a secret the answer does not state
    is a typo or a stale edit, and would silently never leak)."""
    spans = secret_spans(value, where)
    words = span_words(answer)
    missing = [s for s in spans if find_span(span_words(s), words) is None]
    if missing:
        raise UnlearnflowError(
            f"{where}: secret {missing[0]!r} does not occur in the answer {answer!r} "
            "(compared ignoring case, spacing and punctuation)"
        )
    return spans


def _row_kind(row: dict[str, Any]) -> str | None:
    names = {QA_ALIASES.get(k, k) for k in row}
    if {"question", "answer"} <= names:
        return "qa"
    if "text" in row:
        return "text"
    return None


def _key(row: dict[str, Any], kind: str) -> str:
    """What makes two rows the same fact: the question (QA) or the passage (text), whitespace-normalised."""
    return " ".join(row["question" if kind == "qa" else "text"].split())


def _check_disjoint(a: CustomFile, b: CustomFile, why: str) -> None:
    """Raise if rows of ``a`` also appear in ``b`` (the count and the first example, truncated)."""
    seen = {_key(r, b.kind) for r in b.rows}
    shared = [k for k in (_key(r, a.kind) for r in a.rows) if k in seen]
    if shared:
        first = shared[0] if len(shared[0]) <= _EXAMPLE_CHARS else shared[0][:_EXAMPLE_CHARS] + "..."
        raise UnlearnflowError(
            f"{len(shared)} {a.name} row(s) of {a.path} also appear in the {b.name} file {b.path} "
            f"(first: {first!r}); {why}"
        )
