"""The per-fact part of the report: a verdict line per model and ``facts.md``.

The evaluate stage checks every generated forget answer (``metrics.facts``: leaked > refused >
degenerate > wrong), writes the outcome into its per-sample rows and a verdict line into
info.json's ``facts``; this module only reads and lays them out, so the report stage needs neither
torch nor the metrics package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import atomic_file, read_jsonl
from unlearnflow.report import DASH, format_value, is_number, markdown_table, read_info, read_json_file

FACTS_LEGEND = (
    "Each forget example's greedy answer, per model: **leaked** (the user-marked secret, or at least "
    "`evaluate.leak_threshold` of the answer's fact words — its words not in the question nor in its "
    'wrong answers, shared with its paraphrase, stopwords dropped — is generated), *refused* ("I don\'t know"), *degenerate* (empty or repetitive: some run '
    "of 1-4 words three times in a row, or under half distinct words), *wrong* (anything else). "
    "# is the row of the forget split, from 1; prob is exp(−avgNLL) of the reference answer. "
    f"{DASH} = not evaluated (a relearning attack's training pool, or max_samples). "
    'Definitions: docs/metrics.md, "Per-fact leak check".'
)
_ANSWER_CHARS = 60


def read_facts(eval_dir: Path, name: str | None = None) -> dict[str, Any] | None:
    """The per-fact check of one evaluated model: its ``read_info`` identity, ``name`` (``name``,
    else the directory's), ``verdict`` (one line) and ``rows`` (``samples/<split>.jsonl`` by ``index``).

    Returns:
        None when evaluate checked no facts (no generated forget QA split, or an older eval).

    Raises:
        UnlearnflowError: a malformed ``facts`` entry or samples file, naming the file.
    """
    d = Path(eval_dir)
    entry = read_json_file(d / "info.json").get("facts")
    if entry is None:
        return None
    if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("split", "verdict"))):
        raise UnlearnflowError(f"{d / 'info.json'}: facts must be {{split, verdict}} strings, got {entry!r}")
    path = d / "samples" / f"{entry['split']}.jsonl"
    if not path.is_file():
        raise UnlearnflowError(f"{path}: missing (info.json names it as the per-fact split)")
    rows = read_jsonl(path)
    if any("fact_outcome" not in r or not isinstance(r.get("index"), int) for r in rows):
        raise UnlearnflowError(f"{path}: rows without index / fact_outcome (re-run this evaluate)")
    info = read_info(d / "info.json")
    return {
        **info,
        "name": name or d.name,
        "verdict": entry["verdict"],
        "rows": {r["index"]: r for r in rows},
    }


def verdict_lines(facts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's first section: one verdict line per model (``read_facts`` output, in order)."""
    if not facts:
        return []
    lines = [
        "**Is each forgotten fact still produced?** One line per model, from its greedy answers "
        "(leaked = the answer's fact words or its marked secret are generated). Fact by fact: "
        "[facts.md](facts.md).",
        "",
    ]
    return [*lines, *(f"- {f['verdict']}" for f in facts), ""]


def _cell_text(text: Any, chars: int = _ANSWER_CHARS) -> str:
    """A table-safe string: whitespace collapsed, ``|`` escaped, cut to ``chars`` with "…"."""
    flat = " ".join(str(text).split())
    flat = flat if len(flat) <= chars else flat[: chars - 1] + "…"
    return flat.replace("|", "\\|") or DASH


def _prob(row: Mapping[str, Any] | None) -> float:
    """The row's answer probability: its ``prob`` column, else exp(−``nll``); NaN without either."""
    if row is None:
        return math.nan
    if is_number(row.get("prob")):
        return float(row["prob"])
    return math.exp(-row["nll"]) if is_number(row.get("nll")) else math.nan


def _outcome(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return DASH
    return "**leaked**" if row["fact_outcome"] == "leaked" else row["fact_outcome"]


def _fact(row: Mapping[str, Any]) -> str:
    """What is tested: the secret spans when marked, else the fact words."""
    if row.get("secret"):
        return "secret: " + "; ".join(row["secret"])
    return " ".join(row.get("fact_words") or [])


def _is_baseline(m: Mapping[str, Any], baseline: str | None) -> bool:
    return m.get("attack") in (None, baseline)


def facts_markdown(facts: Sequence[Mapping[str, Any]], baseline: str | None = "none") -> list[str]:
    """``facts.md``: the legend, the verdicts, one table of the facts with the target's answer, prob
    (before) and outcome, the oracle's outcome and each control's, then one table per unlearned item
    (method-optimizer-seed): its outcome, prob before → after and answer, then its outcome under
    each attack.

    Args:
        facts: ``read_facts`` of every evaluated model (target, oracle, unlearned items, controls).
        baseline: the attack name of the unattacked unlearned models (``none``-kind).
    """
    target = next((f for f in facts if f["model"] == "target" and f.get("attack") is None), None)
    indices = sorted({i for f in facts for i in f["rows"]})
    first = {i: next(f["rows"][i] for f in facts if i in f["rows"]) for i in indices}
    others = [f for f in facts if f["model"] != "unlearned" and f is not target]
    lines = [
        "# Per-fact check of the forget set",
        "",
        FACTS_LEGEND,
        "",
        *(f"- {f['verdict']}" for f in facts),
    ]
    header = [
        "#",
        "question",
        "fact",
        "target answer",
        "prob (before)",
        "target",
        *(f["name"] for f in others),
    ]
    body = []
    for i in indices:
        before = target["rows"].get(i) if target else None
        cells = [str(i + 1), _cell_text(first[i]["question"]), _cell_text(_fact(first[i]))]
        cells += [_cell_text(before["generation"]) if before else DASH, format_value("prob", _prob(before))]
        cells += [_outcome(before), *(_outcome(f["rows"].get(i)) for f in others)]
        body.append(cells)
    lines += ["", "## Facts (before: the target)", "", *markdown_table(header, body, 4)]
    items: dict[tuple, list[Mapping[str, Any]]] = {}
    for f in facts:
        if f["model"] == "unlearned":
            items.setdefault((f["method"], f["optimizer"], f.get("seed")), []).append(f)
    for (method, optimizer, seed), models in items.items():
        plain = next((m for m in models if _is_baseline(m, baseline)), None)
        attacked = [m for m in models if m is not plain]
        header = ["#", "outcome", "prob before → after", "answer", *(str(m["attack"]) for m in attacked)]
        body = []
        for i in indices:
            row = plain["rows"].get(i) if plain else None
            before = format_value("prob", _prob(target["rows"].get(i) if target else None))
            cells = [str(i + 1), _outcome(row), f"{before} → {format_value('prob', _prob(row))}"]
            cells += [_cell_text(row["generation"]) if row else DASH]
            body.append(cells + [_outcome(m["rows"].get(i)) for m in attacked])
        title = f"{method}-{optimizer}" + (f"-s{seed}" if seed is not None else "")
        lines += ["", f"## {title}", "", *markdown_table(header, body, 4)]
    return [*lines, ""]


def write_facts_markdown(
    facts: Sequence[Mapping[str, Any]], path: Path, baseline: str | None = "none"
) -> None:
    """Write ``facts_markdown`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(facts_markdown(facts, baseline)) + "\n")
