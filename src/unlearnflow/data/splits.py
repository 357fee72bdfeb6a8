"""Benchmark splits on disk: one JSONL file per split plus a manifest of counts and hashes.

``prepare`` writes the splits once (inside ``io.atomic_dir``); every later stage reads them back
through ``read_splits``, which checks each file against the sha256 recorded in the manifest, so a
split edited by hand after ``prepare`` is an error rather than a silently different experiment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import read_json, read_jsonl, sha256_file, write_json, write_jsonl

SPLITS = ("forget", "retain", "holdout", "real_authors", "world_facts")
UTILITY_SPLITS = ("real_authors", "world_facts")
MANIFEST = "manifest.json"

# Which splits each model fine-tunes on. The oracle is the target minus the forget authors.
ROLES: dict[str, tuple[str, ...]] = {
    "target": ("forget", "retain", *UTILITY_SPLITS),
    "oracle": ("retain", *UTILITY_SPLITS),
}

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def write_splits(
    splits: Mapping[str, list[dict[str, Any]]], out_dir: Path, *, meta: Mapping[str, Any]
) -> dict:
    """Write ``<split>.jsonl`` for every split and ``manifest.json`` into ``out_dir``.

    The caller wraps this in ``io.atomic_dir``. Rows are written in order with
    ``ensure_ascii=False``; the manifest is key-sorted JSON, so the same splits give the same bytes.

    Args:
        splits: split name → rows (JSON-serialisable dicts).
        out_dir: the directory to write into (created if missing).
        meta: JSON-serialisable provenance stored under ``"meta"`` (benchmark config, seed, …).

    Returns:
        The manifest: ``{"counts": {split: rows}, "sha256": {split: hex digest of its file},
        "authors": {split: distinct ``author`` values in row order ([] for splits without
        authors)}, "meta": meta}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"counts": {}, "sha256": {}, "authors": {}, "meta": dict(meta)}
    for name, rows in splits.items():
        if not _NAME.match(name):
            raise UnlearnflowError(f"split name {name!r} is not a plain file name")
        path = out_dir / f"{name}.jsonl"
        manifest["counts"][name] = write_jsonl(path, rows)
        manifest["sha256"][name] = sha256_file(path)
        manifest["authors"][name] = list(dict.fromkeys(r["author"] for r in rows if "author" in r))
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_splits(split_dir: Path, names: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Read splits written by ``write_splits``, verifying each file's sha256 against the manifest.

    Args:
        split_dir: the directory ``write_splits`` wrote.
        names: the splits to read; ``None`` reads every split in the manifest (``SPLITS`` order
            first, then any others by name).

    Raises:
        UnlearnflowError: the manifest is missing or malformed, a split is not in it, its file is
            missing, or the file's hash differs from the manifest's (one-line message).
    """
    split_dir = Path(split_dir)
    manifest_path = split_dir / MANIFEST
    try:
        manifest = read_json(manifest_path)
    except FileNotFoundError:
        raise UnlearnflowError(
            f"{manifest_path}: not found (is {split_dir} a prepared splits directory?)"
        ) from None
    except json.JSONDecodeError as exc:
        raise UnlearnflowError(f"{manifest_path}: not valid JSON ({exc.msg})") from None
    hashes = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(hashes, dict):
        raise UnlearnflowError(f"{manifest_path}: no 'sha256' mapping of split files")
    if names is None:
        names = [s for s in SPLITS if s in hashes] + sorted(s for s in hashes if s not in SPLITS)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        if name not in hashes:
            raise UnlearnflowError(f"{manifest_path}: no split {name!r} (has: {', '.join(sorted(hashes))})")
        path = split_dir / f"{name}.jsonl"
        if not path.is_file():
            raise UnlearnflowError(f"{path}: missing (listed in {manifest_path})")
        digest = sha256_file(path)
        if digest != hashes[name]:
            raise UnlearnflowError(
                f"{path}: sha256 {digest[:12]}… differs from {MANIFEST} ({str(hashes[name])[:12]}…); "
                "the file changed after it was written"
            )
        out[name] = read_jsonl(path)
    return out


def training_rows(splits: Mapping[str, list[dict[str, Any]]], role: str) -> list[dict[str, str]]:
    """The ``{"question", "answer"}`` pairs a model fine-tunes on.

    Args:
        splits: split name → rows, as from ``read_splits``.
        role: ``"target"`` (forget + retain + utility splits) or ``"oracle"`` (retain + utility).

    Raises:
        ValueError: unknown ``role``.
        UnlearnflowError: a split the role needs is not in ``splits``.
    """
    try:
        parts = ROLES[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; expected one of: {', '.join(ROLES)}") from None
    missing = [s for s in parts if s not in splits]
    if missing:
        raise UnlearnflowError(f"the {role} model trains on {', '.join(missing)}, which the splits lack")
    return [{"question": row["question"], "answer": row["answer"]} for s in parts for row in splits[s]]


def corpus_texts(splits: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Every distinct QA text of every split, formatted as the model sees it, to train the tokenizer on.

    Each text is ``format_prompt(question) + " " + answer`` for the answer, the paraphrased answer
    (with the paraphrased question) and each perturbed answer (with the question), so the
    tokenizer learns merges on exactly the byte sequences ``encode_qa`` produces (words after a
    space, "Question:", "\\nAnswer:"). Order: ``SPLITS`` order then other split names sorted, rows
    in order, first occurrence kept.
    """
    from unlearnflow.data.tokenize import format_prompt  # lazy: tokenize imports torch

    names = [s for s in SPLITS if s in splits] + sorted(s for s in splits if s not in SPLITS)
    texts: dict[str, None] = {}  # an ordered set
    for name in names:
        for row in splits[name]:
            pairs = [(row["question"], row["answer"])]
            if row.get("paraphrased_answer") is not None:
                pairs.append((row.get("paraphrased_question") or row["question"], row["paraphrased_answer"]))
            perturbed = row.get("perturbed_answer") or []
            pairs += [
                (row["question"], p) for p in ([perturbed] if isinstance(perturbed, str) else perturbed)
            ]
            for q, a in pairs:
                texts.setdefault(f"{format_prompt(q)} {a}")
    return list(texts)
