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

from unlearnflow.data.benchmark import Benchmark, Layout
from unlearnflow.data.tokenize import format_mcq, format_prompt
from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import read_json, read_jsonl, sha256_file, write_json, write_jsonl

MANIFEST = "manifest.json"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def write_splits(bench: Benchmark, out_dir: Path, *, meta: Mapping[str, Any]) -> dict:
    """Write ``<split>.jsonl`` for every split of ``bench`` and ``manifest.json`` into ``out_dir``.

    The caller wraps this in ``io.atomic_dir``. Rows are written in order with
    ``ensure_ascii=False``; the manifest is key-sorted JSON, so the same splits give the same bytes.

    Args:
        bench: the benchmark (its layout goes to the manifest's ``"benchmark"``).
        out_dir: the directory to write into (created if missing).
        meta: JSON-serialisable provenance stored under ``"meta"`` (benchmark config, seed, …),
            merged with the loader's own ``bench.meta``.

    Returns:
        The manifest: ``{"counts": {split: rows}, "sha256": {split: hex digest of its file},
        "authors": {split: distinct ``author`` values in row order ([] for splits without
        authors)}, "benchmark": layout, "meta": meta}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "counts": {},
        "sha256": {},
        "authors": {},
        "benchmark": bench.to_manifest(),
        "meta": {**bench.meta, **meta},
    }
    for name, rows in bench.splits.items():
        if not _NAME.match(name):
            raise UnlearnflowError(f"split name {name!r} is not a plain file name")
        path = out_dir / f"{name}.jsonl"
        manifest["counts"][name] = write_jsonl(path, rows)
        manifest["sha256"][name] = sha256_file(path)
        manifest["authors"][name] = list(dict.fromkeys(r["author"] for r in rows if "author" in r))
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _manifest(split_dir: Path) -> dict[str, Any]:
    manifest_path = Path(split_dir) / MANIFEST
    try:
        manifest = read_json(manifest_path)
    except FileNotFoundError:
        raise UnlearnflowError(
            f"{manifest_path}: not found (is {split_dir} a prepared splits directory?)"
        ) from None
    except json.JSONDecodeError as exc:
        raise UnlearnflowError(f"{manifest_path}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), dict):
        raise UnlearnflowError(f"{manifest_path}: no 'sha256' mapping of split files")
    return manifest


def read_layout(split_dir: Path) -> Layout:
    """The benchmark layout (kinds, roles, training and unlearning splits) of a prepared directory."""
    manifest = _manifest(split_dir)
    if "benchmark" not in manifest:
        raise UnlearnflowError(f"{Path(split_dir) / MANIFEST}: no benchmark layout (re-run prepare)")
    return Layout.from_manifest(manifest["benchmark"])


def read_splits(split_dir: Path, names: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Read splits written by ``write_splits``, verifying each file's sha256 against the manifest.

    Args:
        split_dir: the directory ``write_splits`` wrote.
        names: the splits to read; ``None`` reads every split in the manifest, in its order.

    Raises:
        UnlearnflowError: the manifest is missing or malformed, a split is not in it, its file is
            missing, or the file's hash differs from the manifest's (one-line message).
    """
    split_dir = Path(split_dir)
    manifest_path = split_dir / MANIFEST
    manifest = _manifest(split_dir)
    hashes = manifest["sha256"]
    if names is None:
        names = list(manifest.get("counts") or hashes)
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


def corpus_texts(splits: Mapping[str, list[dict[str, Any]]], layout: Layout) -> list[str]:
    """Every distinct text of every split, formatted as the model sees it, to train the tokenizer on.

    Question/answer rows give ``format_prompt(question) + " " + answer`` for the answer, the
    paraphrased answer (with the paraphrased question) and each perturbed answer, so the tokenizer
    learns merges on exactly the byte sequences ``encode_qa`` produces; other kinds give their
    documents, prompts and continuations, or lettered multiple-choice prompts. Order: splits in
    ``splits`` order, rows in order, first occurrence kept.
    """
    texts: dict[str, None] = {}  # an ordered set
    for name, rows in splits.items():
        kind = layout.info[name].kind
        for row in rows:
            if kind == "text":
                texts.setdefault(row["text"])
            elif kind == "completion":
                texts.setdefault(row["prompt"] + row["gt"])
            elif kind == "mcq":
                texts.setdefault(format_mcq(row["question"], row["choices"]))
            else:
                pairs = [(row["question"], row["answer"])]
                if row.get("paraphrased_answer") is not None:
                    pairs.append(
                        (row.get("paraphrased_question") or row["question"], row["paraphrased_answer"])
                    )
                pairs += [(row["question"], p) for p in row.get("perturbed_answer") or []]
                for q, a in pairs:
                    texts.setdefault(f"{format_prompt(q)} {a}")
    return list(texts)
