"""The comparison report over seeds: summary.json, report.md and the forget-quality / utility plot.

Input: one ``eval/<name>/`` directory per evaluated model, holding ``metrics.json`` (a flat mapping of
metric name → number, NaN allowed) and ``info.json`` (``model``: target | oracle | unlearned; the
``method``, ``optimizer``, ``attack`` and unlearn ``seed`` that produced it, each possibly null); and,
for an unlearned model, its unlearn item's ``health.json`` (``{"flags": [one-line strings]}``; absent
for adopted or older models, which is fine).

The statistics over seeds (``spread``): unlearned models grouped by method × optimizer × attack,
n, mean ± sample sd of every metric (forget_quality also on log10), and which pairs of rows their
spreads separate. This module reads and checks the inputs and writes the three outputs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import atomic_file, write_json
from unlearnflow.spread import GROUP_KEYS, ID_KEYS, LOG_METRICS, RESERVED, finite

log = logging.getLogger(__name__)

LEAD_METRICS = ("forget_quality", "model_utility", "privleak", "facts_leaked")
# The per-fact counts beside facts_leaked (facts_total, facts_refused, …) stay in summary.json and
# facts.md: in report.md's tables they would be six columns for one question, "does it still leak?".
TABLE_FACTS = ("facts_leaked",)
MODELS = ("target", "oracle", "unlearned")
DASH = "–"
WARN = "⚠"

# Legend entries of metric columns, each shown only when its column is in the table: custom data has
# no forget_quality (no truth ratios, no oracle's to compare) and, without a holdout, no privleak or
# mia_* (key "mia_": any column of that prefix).
LEGEND_METRICS = {
    "forget_quality": "- **forget_quality**: KS-test p-value of the forget-set truth ratios against the "
    "oracle's (retrained without the forget set); higher = closer to the oracle. It spans orders of "
    "magnitude, so **log10 forget_quality** (mean ± sd of log10 over seeds; 10^mean is the geometric "
    "mean) is the column to compare; a p-value of 0 counts as 2.2e-308.",
    "model_utility": "- **model_utility**: harmonic mean of the benchmark's utility-split metrics (TOFU: "
    "retain, real authors, world facts; custom: retain); higher = better.",
    "privleak": "- **privleak**: Min-K% membership AUC relative to the oracle's, ×100; 0 = like the "
    "oracle, −100 = the forget set is recognised as training data.",
    "mia_": "- `mia_*`: ROC-AUC of forget vs holdout (0.5 = indistinguishable).",
    "facts_leaked": "- **facts_leaked**: forget examples whose greedy answer still states the fact; the "
    "other outcomes (refused, degenerate, wrong) are in facts.md and summary.json.",
}
LEGEND_ALWAYS = (
    "- **mean ± sd**: over the n unlearn seeds of a row; sd is the sample standard deviation "
    "(n − 1 denominator). Target and oracle are single models (n = 1, no spread).",
    f"- **health**: `ok`, or {WARN} with the seeds whose unlearn run was flagged (diverging loss, "
    f"stalled gradients); {DASH} = not recorded.",
    f"- Numbers to 4 significant digits; {DASH} = not available (NaN, or missing in some seed). "
    "Definitions: docs/metrics.md.",
)


def legend(columns: Sequence[str]) -> str:
    """The legend above the main table: an entry for each metric of ``LEGEND_METRICS`` among
    ``columns`` (the table's metric columns; ``mia_*`` when any starts so), then ``LEGEND_ALWAYS``."""
    shown = [
        text
        for key, text in LEGEND_METRICS.items()
        if (key in columns if not key.endswith("_") else any(c.startswith(key) for c in columns))
    ]
    return "\n".join([*shown, *LEGEND_ALWAYS])


# ---------------------------------------------------------------------------------------------- read


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnlearnflowError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError:
        raise UnlearnflowError(f"{path}: not UTF-8 text") from None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> dict[str, float]:
    """``metrics.json``: a flat mapping of metric name → number; anything else is a one-line error."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise UnlearnflowError(
            f"{path}: expected a flat mapping of metric name → number, got {type(data).__name__}"
        )
    for key, value in data.items():
        if not is_number(value):
            raise UnlearnflowError(
                f"{path}: expected a flat mapping of metric name → number; {key!r} is {value!r}"
            )
    clash = set(RESERVED) & set(data)
    if clash:
        raise UnlearnflowError(f"{path}: reserved keys {sorted(clash)}")
    return {k: float(v) for k, v in data.items()}


def read_info(path: Path) -> dict[str, Any]:
    """``info.json``: the model kind (one of ``MODELS``), method / optimizer / attack (string or
    null) and seed (integer or null); wrong types are a one-line error."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise UnlearnflowError(f"{path}: expected a mapping, got {type(data).__name__}")
    if data.get("model") not in MODELS:
        raise UnlearnflowError(f"{path}: model must be one of {MODELS}, got {data.get('model')!r}")
    for key in ("method", "optimizer", "attack"):
        if not (data.get(key) is None or isinstance(data[key], str)):
            raise UnlearnflowError(f"{path}: {key} must be a string or null, got {data[key]!r}")
    seed = data.get("seed")
    if not (seed is None or (isinstance(seed, int) and not isinstance(seed, bool))):
        raise UnlearnflowError(f"{path}: seed must be an integer or null, got {seed!r}")
    return {k: data.get(k) for k in ID_KEYS}


def read_health(path: Path) -> list[str] | None:
    """The flags of ``health.json`` (``{"flags": [str, ...]}``); ``None`` when the file is absent."""
    if not path.exists():
        return None
    data = read_json_file(path)
    flags = data.get("flags") if isinstance(data, dict) else None
    if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
        raise UnlearnflowError(f'{path}: expected {{"flags": [strings]}}, got {data!r}')
    return flags


def collect_rows(eval_dirs: Sequence[Path], health_files: Sequence[Path | None] | None = None) -> list[dict]:
    """One row per eval directory: ``model, method, optimizer, attack, seed, health``, then every metric.

    Rows are ordered target first, oracle second, then unlearned models sorted by
    ``(method, optimizer, attack, seed)`` (``None`` first; the ``none`` attack before the others).

    Args:
        eval_dirs: directories each holding ``metrics.json`` and ``info.json``.
        health_files: per directory, the ``health.json`` of the unlearn run behind it (or ``None``).

    Returns:
        The rows, as plain dicts; ``health`` is the list of flags, or ``None`` when not recorded.

    Raises:
        UnlearnflowError: one line naming a missing or malformed file.
    """
    health_files = list(health_files) if health_files is not None else [None] * len(eval_dirs)
    rows = []
    for d, health in zip(map(Path, eval_dirs), health_files, strict=True):
        missing = [f for f in ("info.json", "metrics.json") if not (d / f).exists()]
        if missing:
            raise UnlearnflowError(f"eval directory {d} is incomplete: {d / missing[0]} is missing")
        info, metrics = read_info(d / "info.json"), read_metrics(d / "metrics.json")
        flags = read_health(Path(health)) if health is not None else None
        rows.append({**info, "health": flags, **metrics})
    return sorted(rows, key=_row_order)


def _row_order(row: dict) -> tuple:
    method, optimizer = ((row[k] is not None, row[k] or "") for k in ("method", "optimizer"))
    # The unattacked model ("none") leads its attacks: the baseline each attack is read against.
    attack = (row["attack"] not in (None, "none"), row["attack"] or "")
    seed = (row.get("seed") is not None, row.get("seed") or 0)
    return (MODELS.index(row["model"]), method, optimizer, attack, seed)


# ------------------------------------------------------------------------------------------- write


def write_summary(
    rows: Sequence[dict],
    groups: Sequence[dict],
    comparisons: Sequence[dict],
    path: Path,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``summary.json`` atomically (NaN as ``NaN``, keys sorted):

    ``{"runs": [one row per evaluated model and seed, as collect_rows], "groups": [one per method ×
    optimizer × attack, and target / oracle, as group_rows], "comparisons": [as compare_groups]}``,
    plus the ``extra`` sections (``controls``, ``robustness``: see ``robustness.summarize``).
    """
    reserved = {"runs", "groups", "comparisons"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra summary sections clash with {sorted(reserved)}")
    summary = {"runs": list(rows), "groups": list(groups), "comparisons": list(comparisons)}
    write_json(path, {**summary, **(extra or {})})


def metric_columns(rows: Sequence[dict]) -> list[str]:
    """report.md's metric columns: the lead metrics (forget_quality, model_utility, privleak,
    facts_leaked) that any row has, then every other metric found in any row, sorted; of the
    ``facts_*`` counts only ``TABLE_FACTS`` (the rest stay in summary.json)."""
    present = {k for r in rows for k in r} - set(RESERVED)
    present -= {m for m in present if m.startswith("facts_") and m not in TABLE_FACTS}
    return [m for m in LEAD_METRICS if m in present] + sorted(present - set(LEAD_METRICS))


def format_value(key: str, value: Any) -> str:
    """Format one table cell: 4 significant digits, ``forget_quality`` < 1e-3 in scientific notation.

    ``None`` and NaN become ``–``; strings are kept.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key == "forget_quality" and 0 <= value < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def format_mean_sd(key: str, mean: float, sd: float) -> str:
    """``mean ± sd`` (each as ``format_value``); the mean alone when sd is undefined (n = 1)."""
    if not finite(sd):
        return format_value(key, mean)
    return f"{format_value(key, mean)} ± {format_value(key, sd) if sd else '0'}"


def health_cell(group: dict) -> str:
    """``⚠ s1, s2`` (flagged seeds), ``ok``, ``ok (k of n recorded)`` or ``–`` (none recorded)."""
    if group["flagged_seeds"]:
        return f"{WARN} " + ", ".join(f"s{s}" for s in group["flagged_seeds"])
    if not group["health_recorded"]:
        return DASH
    if group["health_recorded"] < group["n"]:
        return f"ok ({group['health_recorded']} of {group['n']} recorded)"
    return "ok"


def flagged_runs(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Unlearn item (``<method>-<optimizer>-s<seed>``) → its health flags, for every flagged run.

    The attacks on one unlearned model share its run: each flagged run appears once.
    """
    flagged: dict[str, list[str]] = {}
    for r in rows:
        if r.get("health"):
            flagged.setdefault(f"{r['method']}-{r['optimizer']}-s{r.get('seed')}", r["health"])
    return flagged


def health_warning(rows: Sequence[dict]) -> list[str]:
    """The report's top lines when any unlearn run was flagged: one per flagged run and flag."""
    flagged = flagged_runs(rows)
    if not flagged:
        return []
    lines = [
        f"> **{WARN} {len(flagged)} unlearn run(s) flagged unhealthy**: their numbers, and the mean ± sd "
        "of every row that includes them, are suspect.",
    ]
    lines += [f"> - `{item}`: {flag}" for item, flags in flagged.items() for flag in flags]
    return [*lines, ""]


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], n_left: int) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < n_left else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(cells) + " |" for cells in body),
    ]


def separation_lines(comparisons: Sequence[dict]) -> list[str]:
    """The 'what holds across seeds' section: per metric, separated pairs, then overlapping ones."""
    on_log = sorted({c["metric"] for c in comparisons if c["scale"] == "log10"})
    lines = [
        "## Which differences hold across seeds",
        "",
        "Per metric, pairs of rows whose mean ± sd intervals do not overlap (*separated*: the seeds "
        "agree on the order) and pairs whose intervals overlap (*not separated*: the difference is "
        "within the seed-to-seed spread). "
        + (f"{', '.join(on_log)} {'is' if len(on_log) == 1 else 'are'} compared on log10. " if on_log else "")
        + "A screen, not a test.",
        "",
    ]
    for metric in dict.fromkeys(c["metric"] for c in comparisons):
        mine = [c for c in comparisons if c["metric"] == metric]
        scale = " (log10)" if mine[0]["scale"] == "log10" else ""
        lines.append(f"**{metric}{scale}**")
        lines.append("")
        for status, title in (
            ("separated", "separated"),
            ("overlap", "not separated"),
            ("no spread", "no spread to compare (n = 1 on both sides)"),
        ):
            pairs = [c for c in mine if c["status"] == status]
            if not pairs:
                continue
            if status == "separated":
                text = [f"`{c['higher']}` > `{c['b'] if c['higher'] == c['a'] else c['a']}`" for c in pairs]
            else:
                text = [f"`{c['a']}` ~ `{c['b']}`" for c in pairs]
            lines.append(f"- {title}: " + "; ".join(text))
        lines.append("")
    return lines


def write_markdown(
    rows: Sequence[dict],
    groups: Sequence[dict],
    comparisons: Sequence[dict],
    path: Path,
    extra: Sequence[str] = (),
    *,
    top: Sequence[str] = (),
) -> None:
    """Write ``report.md`` atomically: the ``top`` lines (the per-fact verdicts, ``verdict_lines``),
    a health warning when any run was flagged, a legend, the table of rows (mean ± sd over seeds),
    which pairs of rows their spreads separate, ``extra`` lines (the methods table and figures,
    ``dynamics``), and every run.

    Main columns: ``model, method, optimizer, attack, n, health``, then ``metric_columns`` (lead
    metrics, forget_quality also as log10, then the others sorted); the legend explains only the
    columns shown.
    """
    metrics = metric_columns(rows)
    cols = [c for m in metrics for c in ([m, f"log10 {m}"] if m in LOG_METRICS else [m])]
    body = []
    for g in groups:
        cells = [format_value(k, g[k]) for k in GROUP_KEYS] + [str(g["n"]), health_cell(g)]
        for c in cols:
            stat, m = ("log10_", c.removeprefix("log10 ")) if c.startswith("log10 ") else ("", c)
            key = "log10" if stat else m
            cells.append(
                format_mean_sd(key, g[f"{stat}mean"].get(m, math.nan), g[f"{stat}sd"].get(m, math.nan))
            )
        body.append(cells)
    runs = [
        [format_value(k, r.get(k)) for k in ID_KEYS]
        + [
            DASH
            if r.get("health") is None
            else (f"{WARN} " + "; ".join(r["health"]) if r["health"] else "ok")
        ]
        + [format_value(m, r.get(m)) for m in metrics]
        for r in rows
    ]
    lines = [
        "# Unlearning report",
        "",
        *top,
        *health_warning(rows),
        legend(metrics),
        "",
        *markdown_table([*GROUP_KEYS, "n", "health", *cols], body, len(GROUP_KEYS) + 2),
        "",
        *separation_lines(comparisons),
        *extra,
        "## Every run",
        "",
        *markdown_table([*ID_KEYS, "health", *metrics], runs, len(ID_KEYS) + 1),
    ]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
