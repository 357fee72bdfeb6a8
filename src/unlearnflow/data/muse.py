"""MUSE News / Books (Shi et al. 2024, arXiv:2407.06460) from a hub id or a local copy.

Both corpora share one layout. On the hub (``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books``)
the first part of each name is a config and the second its split (``load_dataset(id, "knowmem",
split="forget_qa")``); a local copy keeps the same names as paths (``<source>/knowmem/forget_qa.json``).
``sources.read_records`` resolves both.

Splits (name: MUSE part → kind, role):

* ``raw_forget``: ``raw/forget`` → text, train
* ``raw_retain``: ``raw/retain``, or ``raw/retain1`` + ``raw/retain2`` → text, train
* ``verbmem_forget``: ``verbmem/forget`` (``prompt``, ``gt``) → completion, forget
* ``knowmem_forget`` / ``knowmem_retain``: ``knowmem/{forget,retain}_qa`` → knowmem, forget / utility
* ``privleak_forget`` / ``privleak_holdout``: ``privleak/{forget,holdout}`` → text, mia

The knowmem questions are asked few-shot, as in the paper: with ``muse.knowmem_few_shot`` and a
``knowmem/*_qa_icl`` split, every row gets those examples as ``few_shot`` (a list of
``{question, answer}``), which the evaluation renders in the model's prompt format as
open-unlearning does (``PromptFormat.few_shot_prompt_ids``). ``privleak/retain`` exists in MUSE but
is not used: privleak compares forget against holdout, and the retain reference is the oracle
model's score.

Evaluated as the reference's MUSE eval (configs/eval/muse.yaml and muse_metrics/): privleak and
the MIA scores on ``privleak_*`` and ``extraction_strength`` on ``verbmem_forget`` score up to
``evaluate.text_max_length`` (2048) tokens of the text, with no EOS appended (``CompletionDataset``).
"""

from __future__ import annotations

import logging
from typing import Any

from unlearnflow.config import BenchmarkConfig
from unlearnflow.data.benchmark import Benchmark, SplitInfo
from unlearnflow.data.sources import normalize_qa, read_optional, read_required, text_rows
from unlearnflow.errors import UnlearnflowError

logger = logging.getLogger(__name__)

WHO = "muse"


def load(cfg: BenchmarkConfig) -> Benchmark:
    """Read MUSE from ``cfg.source`` into a ``Benchmark`` (see the module docstring for the splits).

    Raises:
        UnlearnflowError: a part is missing (other than the ICL examples and ``raw/retain2``), or
            its rows lack the expected columns.
    """
    assert cfg.source is not None  # guaranteed by BenchmarkConfig's validator
    source = cfg.source
    parts: dict[str, str] = {}

    raw_forget = text_rows(read_required(source, "raw", "forget", who=WHO), "muse raw/forget")
    parts["raw_forget"] = "raw/forget"
    raw_retain, parts["raw_retain"] = _raw_retain(source)
    verbmem = _completion_rows(read_required(source, "verbmem", "forget", who=WHO), "muse verbmem/forget")
    parts["verbmem_forget"] = "verbmem/forget"

    knowmem: dict[str, list[dict[str, Any]]] = {}
    for stream in ("forget", "retain"):
        split = f"{stream}_qa"
        rows = _knowmem_rows(read_required(source, "knowmem", split, who=WHO), f"muse knowmem/{split}")
        parts[f"knowmem_{stream}"] = f"knowmem/{split}"
        if cfg.muse.knowmem_few_shot:
            icl = read_optional(source, "knowmem", f"{split}_icl")
            if icl is None:
                logger.warning(
                    "muse: no knowmem/%s_icl in %s; knowmem questions are asked zero-shot", split, source
                )
            else:
                shots = few_shot_examples(normalize_qa(icl, f"muse knowmem/{split}_icl"))
                rows = [{**r, "few_shot": shots} for r in rows]
                parts[f"knowmem_{stream}"] += f" + knowmem/{split}_icl"
        knowmem[stream] = rows

    privleak: dict[str, list[dict[str, str]]] = {}
    for part in ("forget", "holdout"):
        privleak[part] = text_rows(read_required(source, "privleak", part, who=WHO), f"muse privleak/{part}")
        parts[f"privleak_{part}"] = f"privleak/{part}"

    splits = {
        "raw_forget": raw_forget,
        "raw_retain": raw_retain,
        "verbmem_forget": verbmem,
        "knowmem_forget": knowmem["forget"],
        "knowmem_retain": knowmem["retain"],
        "privleak_forget": privleak["forget"],
        "privleak_holdout": privleak["holdout"],
    }
    info = {
        "raw_forget": SplitInfo("text", "train"),
        "raw_retain": SplitInfo("text", "train"),
        "verbmem_forget": SplitInfo("completion", "forget"),
        "knowmem_forget": SplitInfo("knowmem", "forget"),
        "knowmem_retain": SplitInfo("knowmem", "utility"),
        "privleak_forget": SplitInfo("text", "mia"),
        "privleak_holdout": SplitInfo("text", "mia"),
    }
    return Benchmark(
        splits=splits,
        info=info,
        train={"target": ["raw_forget", "raw_retain"], "oracle": ["raw_retain"]},
        unlearn={"forget": "raw_forget", "retain": "raw_retain"},
        mia=("privleak_forget", "privleak_holdout"),
        forget_quality=None,
        meta={
            "benchmark": "muse",
            "source": source,
            "parts": parts,
            "counts": {n: len(r) for n, r in splits.items()},
        },
    )


def few_shot_examples(examples: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The ICL examples as ``{question, answer}`` pairs, in order (other columns dropped).

    Kept structured rather than pre-rendered, so that a chat model gets them as user / assistant
    turns and a base model as ``Question: …\nAnswer: …`` blocks, as open-unlearning renders them.
    """
    return [{"question": e["question"], "answer": e["answer"]} for e in examples]


def _raw_retain(source: str) -> tuple[list[dict[str, str]], str]:
    """``raw/retain``, or MUSE-News' ``raw/retain1`` + ``raw/retain2`` concatenated."""
    rows = read_optional(source, "raw", "retain")
    if rows is not None:
        return text_rows(rows, "muse raw/retain"), "raw/retain"
    out: list[dict[str, str]] = []
    found = []
    for part in ("retain1", "retain2"):
        rows = read_optional(source, "raw", part)
        if rows is not None:
            out += text_rows(rows, f"muse raw/{part}")
            found.append(f"raw/{part}")
    if not found:
        raise UnlearnflowError(
            f"muse needs raw/retain (or raw/retain1 + raw/retain2) from {source}; none found"
        )
    return out, " + ".join(found)


def _completion_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    """``prompt``/``gt`` rows, other columns dropped."""
    out = []
    for i, row in enumerate(rows):
        if "prompt" not in row or "gt" not in row:
            raise UnlearnflowError(
                f"{where} row {i}: expected prompt and gt columns, found {', '.join(sorted(row)) or 'none'}"
            )
        out.append({"prompt": row["prompt"], "gt": row["gt"]})
    return out


def _knowmem_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``question``/``answer`` rows, other columns dropped."""
    return [{"question": r["question"], "answer": r["answer"]} for r in normalize_qa(rows, where)]
