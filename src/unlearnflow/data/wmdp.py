"""WMDP-style hazardous-knowledge unlearning (Li et al. 2024, arXiv:2403.03218).

Multiple-choice sets measure what the model knows (WMDP bio / cyber should fall, MMLU subjects
should stay); the model is unlearned on text corpora (a forget corpus of the hazardous domain and
a retain corpus of general text). Every set and corpus is a name from ``benchmark.wmdp``: either a
config under ``benchmark.source`` (``wmdp-bio``) or ``<hub id or directory>:<config>``
(``cais/mmlu:college_biology``), resolved by ``sources.parse_ref``.

Split names of the MCQ sets: the config, prefixed with the last path component of the source when
the name carried its own source (``wmdp-bio``; ``cais/mmlu:college_biology`` →
``mmlu_college_biology``), characters outside ``[A-Za-z0-9_.-]`` replaced by ``_``, and ``_2``,
``_3``, ... appended on a clash. Corpora are ``forget_corpus`` and ``retain_corpus``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from unlearnflow.config import BenchmarkConfig
from unlearnflow.data.benchmark import Benchmark, SplitInfo
from unlearnflow.data.sources import parse_ref, read_required, text_rows
from unlearnflow.errors import UnlearnflowError

logger = logging.getLogger(__name__)

WHO = "wmdp"
CORPUS_SPLITS = ("forget_corpus", "retain_corpus")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def load(cfg: BenchmarkConfig) -> Benchmark:
    """Read the MCQ sets and corpora named in ``cfg.wmdp`` into a ``Benchmark``.

    Raises:
        UnlearnflowError: a set or corpus is missing, an MCQ row is malformed (answer not an index
            or letter of its choices), or a corpus has no non-empty document.
    """
    w = cfg.wmdp
    splits: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, SplitInfo] = {}
    refs: dict[str, str] = {}
    for role, names in (("forget", w.forget_mcq), ("utility", w.utility_mcq)):
        for ref in names:
            source, config = parse_ref(ref, cfg.source)
            name = _unique(mcq_split_name(ref, cfg.source), [*splits, *CORPUS_SPLITS])
            splits[name] = mcq_rows(read_required(source, config, w.mcq_split, who=WHO), f"wmdp {ref}")
            info[name] = SplitInfo("mcq", role)
            refs[name] = ref
    for name, corpora in zip(CORPUS_SPLITS, (w.forget_corpus, w.retain_corpus), strict=True):
        splits[name] = _corpus(corpora, cfg)
        info[name] = SplitInfo("text", "train")
        refs[name] = " + ".join(corpora)
    return Benchmark(
        splits=splits,
        info=info,
        train={"target": ["forget_corpus", "retain_corpus"], "oracle": ["retain_corpus"]},
        unlearn={"forget": "forget_corpus", "retain": "retain_corpus"},
        mia=None,
        forget_quality=None,
        meta={
            "benchmark": "wmdp",
            "source": cfg.source,
            "refs": refs,
            "counts": {n: len(r) for n, r in splits.items()},
        },
    )


def mcq_split_name(ref: str, default_source: str | None) -> str:
    """The split name of MCQ set ``ref`` (before de-duplication; see the module docstring)."""
    source, config = parse_ref(ref, default_source)
    name = config if ":" not in ref else f"{PurePosixPath(source.rstrip('/')).name}_{config}"
    name = _UNSAFE.sub("_", name)
    # A split is a file name: it must not start with "." or "-" (splits.write_splits checks).
    return name if re.match(r"[A-Za-z0-9_]", name) else f"_{name}"


def mcq_rows(rows: Sequence[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``question``/``choices``/``answer`` rows with ``answer`` as an index into ``choices``.

    A letter answer (``"B"``, the form of several MCQ copies) becomes its index; other columns
    (MMLU's ``subject``) are dropped.

    Raises:
        UnlearnflowError: a missing column, or an answer that is no index or letter of the choices.
    """
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in ("question", "choices", "answer") if c not in row]
        if missing:
            raise UnlearnflowError(
                f"{where} row {i}: missing column(s) {', '.join(missing)} "
                f"(an MCQ row needs question, choices, answer; has {', '.join(sorted(row)) or 'none'})"
            )
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise UnlearnflowError(
                f"{where} row {i}: choices must be a list of at least 2 strings, got {choices!r}"
            )
        out.append(
            {
                "question": row["question"],
                "choices": list(choices),
                "answer": _answer_index(row["answer"], len(choices), f"{where} row {i}"),
            }
        )
    return out


def _answer_index(answer: Any, n_choices: int, where: str) -> int:
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - ord("A")
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        raise UnlearnflowError(f"{where}: answer must be a choice index or letter, got {answer!r}")
    if not 0 <= index < n_choices:
        raise UnlearnflowError(
            f"{where}: answer {answer!r} is not one of the {n_choices} choices "
            f"(index 0..{n_choices - 1} or letter A..{chr(ord('A') + n_choices - 1)})"
        )
    return index


def _corpus(refs: Sequence[str], cfg: BenchmarkConfig) -> list[dict[str, str]]:
    """The non-empty documents of every corpus in ``refs``, each cut to ``max_corpus_docs``."""
    out: list[dict[str, str]] = []
    for ref in refs:
        source, config = parse_ref(ref, cfg.source)
        docs = text_rows(read_required(source, config, cfg.wmdp.corpus_split, who=WHO), f"wmdp {ref}")
        if not docs:
            raise UnlearnflowError(f"wmdp corpus {ref!r} has no non-empty document")
        if cfg.wmdp.max_corpus_docs is not None and len(docs) > cfg.wmdp.max_corpus_docs:
            logger.info(
                "wmdp: keeping the first %d of %d documents of %s", cfg.wmdp.max_corpus_docs, len(docs), ref
            )
            docs = docs[: cfg.wmdp.max_corpus_docs]
        out += docs
    return out


def _unique(name: str, taken: Sequence[str]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"
