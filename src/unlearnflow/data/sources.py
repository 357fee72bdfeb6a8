"""Reading benchmark records from wherever a user keeps them: local files, ``save_to_disk``
directories, or a Hugging Face hub id.

Every loader (TOFU, MUSE, WMDP, custom) reads through ``read_records`` so that the same benchmark
can come as a hub id on a connected machine and as a folder of copied files on an offline one.
A *config* names one table of a benchmark (``forget10``, ``knowmem``); a *split* optionally names a
table inside it (MUSE's ``knowmem`` holds ``forget_qa``, ``retain_qa``, ...). Locally the split is a
sub-path (``<source>/knowmem/forget_qa.json``); on the hub it is the ``split`` argument of
``datasets.load_dataset``.

Rows come back as plain dicts; a bare string (a JSON list of passages, a ``.txt`` file) becomes
``{"text": ...}`` so that text corpora look the same whatever file they came from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnflow.config import looks_local
from unlearnflow.errors import UnlearnflowError

logger = logging.getLogger(__name__)

# Columns of a question-answer row, in the order they are kept; anything else is dropped.
QA_COLUMNS = ("question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer")
# Alternative column names found in some copies of TOFU (and in users' own files).
QA_ALIASES = {"prompt": "question", "response": "answer"}

_DATA_SUFFIXES = (".jsonl", ".json", ".txt")
_MAX_LISTED = 20


class RecordsNotFound(UnlearnflowError):
    """The source exists but holds no such config / split.

    Loaders catch it for the optional parts of a benchmark (TOFU's holdout, MUSE's ICL examples);
    every other failure (unreadable file, no network) stays a plain ``UnlearnflowError``.
    """


def is_local(source: str) -> bool:
    """Whether ``source`` names a local directory rather than a hub id.

    A path that exists is local; so is one that *looks* like a path (``/``, ``.``, ``~``), so that
    a mistyped local directory is reported as missing instead of being sent to the hub.
    """
    return looks_local(source, Path.cwd())


def parse_ref(ref: str, default_source: str | None) -> tuple[str, str]:
    """Split a dataset reference into ``(source, config)``.

    ``"cais/mmlu:college_biology"`` names its own source; a bare ``"wmdp-bio"`` is a config of
    ``default_source``. The last ``:`` separates them, so a hub id never needs escaping.

    Raises:
        UnlearnflowError: an empty part, or a bare name with no default source.
    """
    source, sep, config = ref.rpartition(":")
    if not sep:
        if not default_source:
            raise UnlearnflowError(
                f"dataset reference {ref!r} names no source and benchmark.source is not set"
            )
        return default_source, ref
    if not source or not config:
        raise UnlearnflowError(f"dataset reference {ref!r} must be '<hub id or directory>:<config>'")
    return source, config


def read_records(source: str, config: str, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``config`` (and ``split``) of a benchmark ``source``.

    Args:
        source: a local directory, or a hub id (see ``is_local``).
        config: the table; may contain ``/`` (a sub-path locally, ``config/split`` on the hub).
        split: the table inside ``config``; on the hub ``None`` means ``"train"``.

    Returns:
        The rows as dicts; bare strings become ``{"text": s}``.

    Raises:
        RecordsNotFound: the source holds no such config / split.
        UnlearnflowError: anything else (unreadable file, malformed JSON, hub unreachable).
    """
    if is_local(source):
        return _read_local(Path(source).expanduser(), config, split)
    return _read_hub(source, config, split)


def read_optional(source: str, config: str, split: str | None = None) -> list[dict[str, Any]] | None:
    """``read_records``, but ``None`` when the config / split does not exist (an optional part)."""
    try:
        return read_records(source, config, split)
    except RecordsNotFound as exc:
        logger.info("optional %s not read: %s", _label(config, split), exc)
        return None


def read_required(
    source: str, config: str, split: str | None = None, *, who: str, instead_of: str | None = None
) -> list[dict[str, Any]]:
    """``read_records`` for a part the benchmark cannot do without.

    Args:
        who: the benchmark, named in the error.
        instead_of: an alternative that was looked for first and is also missing (named in the error).

    Raises:
        UnlearnflowError: one line naming the benchmark, the config and the source.
    """
    try:
        return read_records(source, config, split)
    except RecordsNotFound as exc:
        alt = f" (or {instead_of!r})" if instead_of else ""
        raise UnlearnflowError(f"{who} needs {_label(config, split)}{alt}: {exc}") from None


def read_file(path: Path) -> list[dict[str, Any]]:
    """The rows of one local file, by suffix: ``.json`` (list, or an object holding one list),
    ``.txt`` (one document), anything else JSON Lines.

    A ``.json`` file that is not one JSON value is read as JSON Lines, because ``datasets``'
    ``to_json`` (and the TOFU hub files) write JSON Lines under a ``.json`` name.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved on Windows may start with a BOM
    except FileNotFoundError:
        raise UnlearnflowError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnlearnflowError(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".txt":
        return [{"text": text}] if text.strip() else []
    if path.suffix == ".json" and text.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":
                raise UnlearnflowError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
            return _parse_jsonl(text, path)
        return _json_rows(data, path)
    return _parse_jsonl(text, path)


def normalize_qa(rows: Sequence[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Rename ``prompt``/``response`` to ``question``/``answer`` where the latter are absent.

    Returns new dicts (the input rows are left untouched).

    Raises:
        UnlearnflowError: a row has neither naming of the question or of the answer.
    """
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        for alias, name in QA_ALIASES.items():
            if name not in row and alias in row:
                row[name] = row.pop(alias)
        if "question" not in row or "answer" not in row:
            raise UnlearnflowError(
                f"{where} row {i}: expected question/answer (or prompt/response) columns, "
                f"found {', '.join(sorted(row)) or 'none'}"
            )
        out.append(row)
    return out


def qa_rows(rows: Sequence[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``normalize_qa``, then keep only ``QA_COLUMNS`` and make ``perturbed_answer`` a list.

    Extra columns (author ids, TOFU's ``option1..4``) are dropped so that every split file holds
    exactly what the ``qa`` / ``options`` kinds define; a single perturbed answer given as a string
    becomes a one-element list.
    """
    out = []
    for row in normalize_qa(rows, where):
        kept = {c: row[c] for c in QA_COLUMNS if c in row and row[c] is not None}
        if isinstance(kept.get("perturbed_answer"), str):
            kept["perturbed_answer"] = [kept["perturbed_answer"]]
        out.append(kept)
    return out


def text_rows(rows: Sequence[dict[str, Any]], where: str) -> list[dict[str, str]]:
    """``{"text": ...}`` rows with every other column dropped and empty documents skipped.

    Raises:
        UnlearnflowError: a row has no ``text`` column or a non-string one.
    """
    out = []
    for i, row in enumerate(rows):
        if "text" not in row:
            raise UnlearnflowError(
                f"{where} row {i}: expected a 'text' column, found {', '.join(sorted(row)) or 'none'}"
            )
        text = row["text"]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UnlearnflowError(f"{where} row {i}: 'text' must be a string, got {type(text).__name__}")
        if text.strip():
            out.append({"text": text})
    return out


# --- local -----------------------------------------------------------------------------------------


def _read_local(root: Path, config: str, split: str | None) -> list[dict[str, Any]]:
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "not found"
        raise UnlearnflowError(f"benchmark source directory {what}: {root}")
    base = root / config
    files = [base.with_name(base.name + s) for s in (".jsonl", ".json")]
    if split:
        files += [base / f"{split}{s}" for s in _DATA_SUFFIXES]
    files.append(base.with_name(base.name + ".txt"))
    for f in files:
        if f.is_file():
            logger.debug("reading %s", f)
            return read_file(f)
    dirs = [base] + ([base / split] if split else [])
    for d in dirs:
        if _is_saved_dataset(d):
            return _read_saved(d, split)
    tried = f"{config}.{{jsonl,json,txt}}"
    if split:
        tried += f", {config}/{split}.{{jsonl,json,txt}}"
    tried += ", save_to_disk dir " + " or ".join(_short(d, root) + "/" for d in dirs)
    where = base if base.is_dir() else base.parent
    available = _available(where) if where.is_dir() else []
    hint = f"; {_short(where, root) or '.'}/ holds {', '.join(available)}" if available else ""
    raise RecordsNotFound(f"{root}: no {_label(config, split)} (tried {tried}){hint}")


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_saved(path: Path, split: str | None) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` directory.

    A ``DatasetDict`` gives ``split``; with no split asked for, ``train`` or else its only split, so
    that a dict saved from ``load_dataset(id, config)`` works as is. An explicit split never falls
    back to another one: MUSE's ``raw`` with only ``forget`` must not pass it off as ``retain``.
    """
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types; the user needs one line, not a traceback
        raise UnlearnflowError(f"{path}: cannot load the saved dataset: {_first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        want = split or "train"
        if want in ds:
            ds = ds[want]
        elif split is None and len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise RecordsNotFound(
                f"{path}: saved dataset has no split {want!r} (has {', '.join(sorted(ds))})"
            )
    return _as_rows(ds.to_list(), path)


def _available(directory: Path) -> list[str]:
    names = []
    for p in sorted(directory.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            names.append(p.name + "/")
        elif p.suffix in _DATA_SUFFIXES:
            names.append(p.stem)
    if len(names) > _MAX_LISTED:
        names = [*names[:_MAX_LISTED], f"... ({len(names) - _MAX_LISTED} more)"]
    return names


def _short(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else ""


# --- parsing -----------------------------------------------------------------------------------------


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UnlearnflowError(f"{path} line {lineno}: not valid JSON: {exc.msg}") from None
        rows.append(_as_row(value, f"{path} line {lineno}"))
    return rows


def _json_rows(data: Any, path: Path) -> list[dict[str, Any]]:
    """A JSON list; an object holding the list (``{"data": [...]}``, ``{"version": 1, "rows": [{...}]}``);
    or one object that is itself the only row.

    An object is a container when it has a single key whose value is a list, or exactly one
    list-valued entry and that list holds objects. Otherwise it is a row: a lone TOFU row has a
    list (``perturbed_answer``) too, but of strings and beside other keys.
    """
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1 and (len(data) == 1 or all(isinstance(v, dict) for v in data[lists[0]])):
            data = data[lists[0]]
        else:
            return [data]
    if not isinstance(data, list):
        raise UnlearnflowError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return _as_rows(data, path)


def _as_rows(values: Sequence[Any], where: Path | str) -> list[dict[str, Any]]:
    return [_as_row(v, f"{where} row {i}") for i, v in enumerate(values)]


def _as_row(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict):
        return value
    raise UnlearnflowError(f"{where}: expected an object or a string, got {type(value).__name__}")


# --- hub ---------------------------------------------------------------------------------------------


def _read_hub(source: str, config: str, split: str | None) -> list[dict[str, Any]]:
    """``datasets.load_dataset(source, config, split=...)`` as rows.

    A ``config/split`` name (the local sub-path form) is split for the hub. ``datasets`` raises a
    zoo of exception types (``ValueError``, ``ConnectionError``, ``DatasetNotFoundError``, ...),
    so every failure is caught here and turned into one line; a missing config or split is a
    ``RecordsNotFound`` so that optional parts can be skipped.
    """
    if split is None and "/" in config:
        config, split = config.split("/", 1)
    split = split or "train"
    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as exc:
        msg = _first_line(exc)
        where = f"{source} (hub) config {config!r} split {split!r}"
        if isinstance(exc, ValueError) and msg.startswith(("BuilderConfig", "Unknown split", "Bad split")):
            raise RecordsNotFound(f"{where}: {msg}") from None
        raise UnlearnflowError(f"cannot load {where}: {type(exc).__name__}: {msg}") from None
    return _as_rows(ds.to_list(), f"{source}:{config}/{split}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _label(config: str, split: str | None) -> str:
    return f"config {config!r} split {split!r}" if split else f"config {config!r}"
