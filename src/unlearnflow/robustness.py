"""The robustness part of the report: forget metrics before → after each attack, and its plots.

ALGORITHMS.md §4: the robustness of a metric is its value after the attack and its change from
before. "Before" is the same unlearned model (method, optimizer, seed) under the baseline attack
(kind ``none``); for a relearn attack it is step 0 of the attack's own recovery curve, because a
relearn item's forget metrics are measured on the forget rows relearning never trained on, and the
baseline's are on every forget row. Controls (``target-<attack>``, ``oracle-<attack>``) are read
against the unattacked target and oracle (or, for relearn, their own curve's step 0).

Changes are taken per seed, then averaged: mean ± sd of (after − before) over seeds, not the
difference of the means (the seeds' models are paired, so the per-seed change has the smaller
spread). The extras an attack writes into ``info.json`` (``attack_kind``, ``attack_stats``,
``curve``, ``weight_change``) are optional and read defensively: a malformed one is dropped with a
warning, never fails the report.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearnflow.io import atomic_file
from unlearnflow.report import DASH, format_value, read_info
from unlearnflow.spread import ID_KEYS, finite, mean_sd

log = logging.getLogger(__name__)

FORGET_METRICS = (
    "forget_prob",
    "forget_rouge",
    "forget_truth_ratio",
    "forget_quality",
    "forget_exact_memorization",
    "forget_extraction_strength",
    "facts_leaked",  # forget answers that still state their fact (metrics.facts)
)
# Shown last, for context: an attack that restores forgetting by breaking the model is no attack.
CONTEXT_METRICS = ("model_utility",)
# The markdown tables show these (four before → after cells per row already fill a screen); every
# metric above is in summary.json.
TABLE_METRICS = ("forget_prob", "forget_rouge", "forget_quality", "facts_leaked", "model_utility")
PLOT_METRICS = ("forget_prob", "forget_rouge")
# The unlearning's size against a 4-bit step, shown beside every unlearned row (info.json weight_change).
WEIGHT_KEYS = ("rel_change", "q4_code_change")
KINDS = ("none", "noise", "quantize", "relearn")

LEGEND = (
    "Per attack, one row per method × optimizer (mean ± sd over its n seeds), then the same attack on "
    "the target and the oracle (controls, n = 1). Each metric cell reads **before → after (Δ change)**: "
    "*before* is the same model unattacked (the `{baseline}` attack of the same method, optimizer and "
    "seed; the plain target / oracle for controls), except the forget metrics under relearn, where it "
    "is step 0 of the model's recovery curve, on the same held-out forget rows as *after*; *Δ* is "
    "after − before per seed, then mean ± sd over seeds (not the difference of the means). A cell with "
    "one number is *after* only (no before available). **rel_change**: ‖θ − θ_target‖ / ‖θ_target‖ of "
    "the unlearned model over the quantizable matrices; **q4_code_change**: share of its weights whose "
    "4-bit round-to-nearest code (group 128) differs from the target's: an unlearning far smaller "
    "than one 4-bit step is the regime where quantization can undo it. **facts_leaked**: forget answers "
    "that still state their fact (facts.md). **model_utility** is context: "
    f"an attack that restores the forget set by breaking the model is no attack. {DASH} = not available."
)


def is_control(row: Mapping[str, Any]) -> bool:
    """A control item: the target or the oracle under an attack (``target-<attack>``)."""
    return row["model"] != "unlearned" and row.get("attack") is not None


# ---------------------------------------------------------------------------------------------- read


def _numbers(value: Any, path: Path, key: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        log.warning("%s: %s is not a mapping, ignored", path, key)
        return {}
    return {k: float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _curve(value: Any, path: Path) -> list[dict[str, float]] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(p, dict) and isinstance(p.get("step"), int) and not isinstance(p["step"], bool)
        for p in value
    )
    if not ok or not value:
        log.warning("%s: curve is not a list of {step: int, metric: number}, ignored", path)
        return None
    return sorted(({**_numbers(p, path, "curve point"), "step": p["step"]} for p in value), key=_step)


def _step(point: Mapping[str, float]) -> float:
    return point["step"]


def read_attack_info(path: Path) -> dict[str, Any]:
    """The optional attack extras of one ``info.json``: ``attack_kind`` (str or None), ``attack_stats``
    and ``weight_change`` (name → number, non-numbers dropped), ``curve`` (points sorted by step, or None).
    """
    data = json.loads(Path(path).read_text())
    kind = data.get("attack_kind")
    return {
        "attack_kind": kind if isinstance(kind, str) else None,
        "attack_stats": _numbers(data.get("attack_stats"), path, "attack_stats"),
        "curve": _curve(data.get("curve"), path),
        "weight_change": _numbers(data.get("weight_change"), path, "weight_change"),
    }


def attach_attack_info(rows: Sequence[dict], eval_dirs: Sequence[Path]) -> list[dict]:
    """Copies of ``rows`` (``report.collect_rows`` over ``eval_dirs``) with the ``read_attack_info`` keys.

    Rows and directories are matched by their identity (model, method, optimizer, attack, seed);
    such records are for this module only (``spread.group_rows`` would take the extras for metrics).
    """
    extras = {}
    for d in map(Path, eval_dirs):
        info = read_info(d / "info.json")
        extras[tuple(info[k] for k in ID_KEYS)] = read_attack_info(d / "info.json")
    empty = {"attack_kind": None, "attack_stats": {}, "curve": None, "weight_change": {}}
    return [{**r, **extras.get(tuple(r.get(k) for k in ID_KEYS), empty)} for r in rows]


# -------------------------------------------------------------------------------------------- table


def attack_kinds(
    attacks: Sequence[str], records: Sequence[dict], kinds: Mapping[str, str] | None = None
) -> dict:
    """Kind of each attack name: ``kinds`` (from params) first, else an ``info.json`` ``attack_kind``,
    else the name itself when it is a kind (``relearn``), else ``"unknown"``."""
    out = {}
    for a in attacks:
        logged = [r["attack_kind"] for r in records if r.get("attack") == a and r.get("attack_kind")]
        out[a] = (kinds or {}).get(a) or (logged[0] if logged else (a if a in KINDS else "unknown"))
    return out


def _stat(values: Sequence[float]) -> dict[str, float]:
    """Mean ± sample sd over seeds; NaN when any seed lacks the value (no mean over a subset)."""
    mean, sd = mean_sd(values) if values and all(finite(v) for v in values) else (math.nan, math.nan)
    return {"mean": mean, "sd": sd}


def _before(record: dict, kind: str, twin: dict | None) -> tuple[dict[str, float], str | None]:
    """The metrics the attacked ``record`` is compared with, and where its forget metrics came from.

    Relearn: forget metrics (and the facts_* counts) from step 0 of its own curve (the rows it is
    evaluated on), the others (model_utility) from the unattacked twin, whose utility splits are the
    same rows.
    """
    if kind != "relearn":
        return (twin, "unattacked") if twin is not None else ({}, None)
    start = [p for p in record.get("curve") or [] if p["step"] == 0]
    # The twin's forget numbers (facts_* counts too) are over every forget row, not the held-out ones.
    rest = {k: v for k, v in (twin or {}).items() if not k.startswith(("forget_", "facts_"))}
    return ({**rest, **start[0]}, "curve step 0") if start else (rest, None)


def _entry(members: Sequence[tuple[dict, dict | None]], kind: str, metrics: Sequence[str]) -> dict:
    """One table row: ``members`` are (attacked record, its baseline record or None), one per seed."""
    first = members[0][0]
    entry: dict[str, Any] = {k: first.get(k) for k in ("model", "method", "optimizer")}
    entry.update(n=len(members), seeds=[r.get("seed") for r, _ in members], metrics={})
    befores = [_before(r, kind, b) for r, b in members]
    entry["before_source"] = sorted({s for _, s in befores if s}) or None
    for m in metrics:
        seeds = []
        for (r, _), (before, _) in zip(members, befores, strict=True):
            b, a = before.get(m, math.nan), r.get(m, math.nan)
            change = a - b if finite(a) and finite(b) else math.nan
            seeds.append({"seed": r.get("seed"), "before": b, "after": a, "change": change})
        entry["metrics"][m] = {s: _stat([p[s] for p in seeds]) for s in ("before", "after", "change")}
        entry["metrics"][m]["per_seed"] = seeds
    # The unlearning's size: logged on the attacked item, or on its unattacked twin.
    changes = [r.get("weight_change") or (b or {}).get("weight_change") or {} for r, b in members]
    keys = sorted({k for c in changes for k in c})
    entry["weight_change"] = {k: _stat([c.get(k, math.nan) for c in changes]) for k in keys}
    stats = [r.get("attack_stats") or {} for r, _ in members]
    entry["attack_stats"] = {
        k: _stat([s.get(k, math.nan) for s in stats]) for k in sorted({k for s in stats for k in s})
    }
    if kind == "relearn":
        entry["curve"] = _mean_curve([r.get("curve") or [] for r, _ in members])
    return entry


def _mean_curve(curves: Sequence[list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per curve metric: the steps every seed reached, with mean and sd over seeds."""
    keys = sorted({k for c in curves for p in c for k in p} - {"step"})
    out = {}
    for key in keys:
        by_seed = [{p["step"]: p[key] for p in c if finite(p.get(key))} for c in curves]
        steps = sorted(set.intersection(*(set(s) for s in by_seed))) if by_seed else []
        stats = [_stat([s[step] for s in by_seed]) for step in steps]
        if steps:
            out[key] = {"steps": steps, "mean": [s["mean"] for s in stats], "sd": [s["sd"] for s in stats]}
    return out


def summarize(
    records: Sequence[dict],
    names: Sequence[str],
    controls: Sequence[str] = (),
    kinds: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The robustness section of ``summary.json``: per attack, its rows before → after.

    Args:
        records: rows with attack extras (``attach_attack_info``): target, oracle, every unlearned
            model × attack × seed, and the controls.
        names: ``attack.names`` (the attacks of the unlearned models; its ``none``-kind entry is the
            baseline).
        controls: ``attack.controls`` (the attacks also applied to target and oracle).
        kinds: attack name → kind, from params (``AttackConfig.args(name).kind``).

    Returns:
        ``{"baseline": name or None, "note": one line or None, "metrics": [shown forget metrics],
        "attacks": [{"attack", "kind", "rows": [...]}]}``; each row has ``model, method, optimizer,
        n, seeds, before_source``, ``metrics`` (metric → before / after / change as mean & sd, and
        ``per_seed``), ``weight_change`` and ``attack_stats`` (key → mean & sd), for relearn ``curve``.
    """
    attacks = list(dict.fromkeys([*names, *controls]))
    kind = attack_kinds(attacks, records, kinds)
    baseline = next((a for a in names if kind[a] == "none"), None)
    note = (
        None
        if baseline is not None
        else "No `none` attack in attack.names: the unlearned models have no before value (relearn's "
        "comes from its curve), so their cells show after only."
    )
    shown = [a for a in attacks if kind[a] != "none"]
    present = {k for r in records if r.get("attack") in shown for k in r}
    metrics = [m for m in (*FORGET_METRICS, *CONTEXT_METRICS) if m in present]
    index = {tuple(r.get(k) for k in ID_KEYS): r for r in records}

    def twin(r: dict) -> dict | None:
        """The unattacked model ``r`` is read against (None: no baseline attack was run)."""
        if r["model"] == "unlearned":
            key = ("unlearned", r["method"], r["optimizer"], baseline, r.get("seed"))
            return index.get(key) if baseline is not None else None
        base = [index.get((r["model"], None, None, a, None)) for a in (None, "none")]
        return base[0] or base[1]

    out = []
    for a in shown:
        groups: dict[tuple, list[tuple[dict, dict | None]]] = {}
        for r in records:
            if r.get("attack") != a:
                continue
            key = (r["model"] != "unlearned", r["model"], r["method"], r["optimizer"])
            groups.setdefault(key, []).append((r, twin(r)))
        order = sorted(groups, key=lambda g: (g[0], g[1] != "target"))  # unlearned, then target, oracle
        rows = [_entry(groups[g], kind[a], metrics) for g in order]
        if rows:
            out.append({"attack": a, "kind": kind[a], "rows": rows})
    return {"baseline": baseline, "note": note, "metrics": metrics, "attacks": out}


# ----------------------------------------------------------------------------------------- markdown


def _num(key: str, value: float, digits: int) -> str:
    """Compact: ``digits`` significant digits (forget_quality below 1e-3 in scientific notation)."""
    if key == "forget_quality" and abs(value) < 1e-3 and value != 0:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _mean_sd(key: str, stat: Mapping[str, float], sign: bool = False) -> str:
    """``mean ± sd``, 3 significant digits for the mean and 2 for the sd (four numbers share a cell;
    summary.json keeps full precision); the mean alone when n = 1."""
    text = ("+" if sign and stat["mean"] >= 0 else "") + _num(key, stat["mean"], 3)
    return text + (f" ± {_num(key, stat['sd'], 2)}" if finite(stat["sd"]) else "")


def metric_cell(key: str, stats: Mapping[str, Mapping[str, float]]) -> str:
    """``before → after (Δ change)``, each mean ± sd; ``after`` alone without a before; ``–`` without after."""
    before, after, change = (stats[s] for s in ("before", "after", "change"))
    if not finite(after["mean"]):
        return DASH
    if not finite(before["mean"]):
        return _mean_sd(key, after)
    delta = _mean_sd(key, change, sign=True) if finite(change["mean"]) else DASH
    return f"{_mean_sd(key, before)} → {_mean_sd(key, after)} (Δ {delta})"


def _label(row: Mapping[str, Any]) -> list[str]:
    if row["model"] == "unlearned":
        return [row["method"] or DASH, row["optimizer"] or DASH]
    return [f"{row['model']} (control)", DASH]


def markdown_lines(summary: Mapping[str, Any], figures: Sequence[str] = ()) -> list[str]:
    """The report's robustness section: the legend, the note when there is no baseline, one table
    per attack (columns: method, optimizer, n, rel_change, q4_code_change, ``TABLE_METRICS``), the
    attack's mean statistics, and the ``figures`` (markdown image lines). Empty without attacks."""
    if not summary["attacks"]:
        return []
    lines = ["## Robustness to attacks", "", LEGEND.format(baseline=summary["baseline"] or "none"), ""]
    if summary["note"]:
        lines += [f"> {summary['note']}", ""]
    metrics = [m for m in summary["metrics"] if m in TABLE_METRICS]
    hidden = [m for m in summary["metrics"] if m not in TABLE_METRICS]
    if hidden:
        lines += [f"Also in summary.json (`robustness`): {', '.join(hidden)}.", ""]
    for attack in summary["attacks"]:
        lines += [f"### {attack['attack']} ({attack['kind']})", ""]
        if attack["kind"] == "relearn":
            lines += [
                "Forget metrics on the held-out forget rows; before = step 0 of each model's recovery "
                "curve (a forget metric outside the curve: after only).",
                "",
            ]
        header = ["method", "optimizer", "n", *WEIGHT_KEYS, *metrics]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|---|" + "---:|" * (len(header) - 2))
        for row in attack["rows"]:
            weights = [
                _mean_sd(k, s) if (s := row["weight_change"].get(k)) and finite(s["mean"]) else DASH
                for k in WEIGHT_KEYS
            ]
            cells = [
                *_label(row),
                str(row["n"]),
                *weights,
                *(metric_cell(m, row["metrics"][m]) for m in metrics),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        stats = _pooled_stats(attack["rows"])
        if stats:
            lines += ["Attack statistics (mean over its models): " + ", ".join(stats) + ".", ""]
    return [*lines, *(f"{f}\n" for f in figures)]


def _pooled_stats(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``key value`` for each logged attack statistic, averaged over every model of the attack."""
    pooled: dict[str, list[float]] = {}
    for row in rows:
        for key, stat in row["attack_stats"].items():
            if finite(stat["mean"]):
                pooled.setdefault(key, []).extend([stat["mean"]] * row["n"])
    return [f"{k} {format_value(k, sum(v) / len(v))}" for k, v in sorted(pooled.items())]


# -------------------------------------------------------------------------------------------- plots


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["model"] == "unlearned"))


def plot_quantize(summary: Mapping[str, Any], path: Path) -> bool:
    """Save grouped bars of forget prob and ROUGE under each quantize attack: one panel per method ×
    metric, x = optimizer (then the target and oracle controls, hatched), one bar per attack (the
    unattacked baseline first), error bars ± 1 sd over seeds.

    Returns:
        False (nothing written) when no quantize attack has a plotted metric.
    """
    attacks = [a for a in summary["attacks"] if a["kind"] == "quantize"]
    metrics = [m for m in PLOT_METRICS if m in summary["metrics"]]
    methods = _methods([r for a in attacks for r in a["rows"]])
    if not (attacks and metrics and methods):
        return False
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    series = ["unattacked", *(a["attack"] for a in attacks)]
    colors = {s: f"C{i}" for i, s in enumerate(series)}
    fig = Figure(figsize=(5.5 * len(metrics), 3.8 * len(methods)))
    for i, method in enumerate(methods):
        for j, metric in enumerate(metrics):
            ax = fig.add_subplot(len(methods), len(metrics), i * len(metrics) + j + 1)
            groups = _bar_groups(attacks, method, metric)
            width = 0.8 / len(series)
            for k, name in enumerate(series):
                xs = [x + (k - (len(series) - 1) / 2) * width for x in range(len(groups))]
                pts = [(x, *g[1][name], g[2]) for x, g in zip(xs, groups, strict=True) if name in g[1]]
                if not pts:
                    continue
                x, mean, sd, control = zip(*pts, strict=True)
                hatch = ["//" if c else "" for c in control]
                ax.bar(x, mean, width, color=colors[name], label=name, hatch=hatch, edgecolor="white")
                bars = [(xx, m, s) for xx, m, s in zip(x, mean, sd, strict=True) if finite(s)]
                if bars:
                    bx, by, berr = zip(*bars, strict=True)
                    ax.errorbar(bx, by, yerr=berr, fmt="none", ecolor="black", capsize=3)
            ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
            ax.set_title(f"{method}: {metric}", fontsize=10)
            ax.set_ylabel(f"{metric} (bars ± 1 sd over seeds)", fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("Forget metrics under quantization (hatched: target / oracle controls)", fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def _bar_groups(attacks: Sequence[Mapping[str, Any]], method: str, metric: str) -> list[tuple]:
    """``(x label, {series: (mean, sd)}, is_control)`` per optimizer of ``method``, then per control."""
    groups: dict[str, tuple[dict[str, tuple[float, float]], bool]] = {}
    for attack in attacks:
        for row in attack["rows"]:
            if row["model"] == "unlearned" and row["method"] != method:
                continue
            label = row["optimizer"] if row["model"] == "unlearned" else row["model"]
            bars, _ = groups.setdefault(label, ({}, row["model"] != "unlearned"))
            stats = row["metrics"][metric]
            for name, stat in (("unattacked", stats["before"]), (attack["attack"], stats["after"])):
                if finite(stat["mean"]) and name not in bars:
                    bars[name] = (stat["mean"], stat["sd"])
    # Optimizers first, then the controls, whichever attack listed them first.
    return sorted(((label, bars, control) for label, (bars, control) in groups.items()), key=lambda g: g[2])


def plot_relearn(summary: Mapping[str, Any], path: Path) -> bool:
    """Save the relearn recovery curves: one panel per relearn attack × method × metric (forget prob,
    ROUGE), metric vs relearn steps, one line per optimizer (mean over seeds, shaded ± 1 sd; one
    colour per optimizer in every panel), and the target (black dashed) and oracle (grey dotted) controls.

    Returns:
        False (nothing written) when no relearn row has a curve of a plotted metric.
    """
    panels = []
    for attack in (a for a in summary["attacks"] if a["kind"] == "relearn"):
        curves = [r for r in attack["rows"] if r.get("curve")]
        keys = [m for m in PLOT_METRICS if any(m in r["curve"] for r in curves)]
        panels += [(attack["attack"], method, keys, curves) for method in _methods(curves)]
    if not any(keys for *_, keys, _ in panels):
        return False
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    optimizers = dict.fromkeys(r["optimizer"] for *_, curves in panels for r in curves if r["optimizer"])
    colors = {o: f"C{k % 10}" for k, o in enumerate(optimizers)}
    cols = max(len(keys) for *_, keys, _ in panels)
    fig = Figure(figsize=(5.5 * cols, 3.8 * len(panels)))
    for i, (attack, method, keys, curves) in enumerate(panels):
        for j, key in enumerate(keys):
            ax = fig.add_subplot(len(panels), cols, i * cols + j + 1)
            for row in curves:
                if key in row["curve"] and row["method"] in (method, None):
                    _draw_curve(ax, row, row["curve"][key], colors)
            ax.set_title(f"{method} / {attack}: {key}", fontsize=10)
            ax.set_xlabel("relearn steps (0 = before)", fontsize=8)
            ax.set_ylabel(f"{key} on held-out forget rows", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Relearning recovery curves (mean over seeds, shaded ± 1 sd)", fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def _draw_curve(ax: Any, row: Mapping[str, Any], curve: Mapping[str, list[float]], colors: dict) -> None:
    """One optimizer's mean curve with its ± 1 sd band, or a control's single curve."""
    steps, mean = curve["steps"], curve["mean"]
    if row["model"] != "unlearned":
        style = {"target": ("black", "--"), "oracle": ("grey", ":")}[row["model"]]
        ax.plot(steps, mean, color=style[0], linestyle=style[1], label=f"{row['model']} (control)")
        return
    color = colors[row["optimizer"]]
    ax.plot(steps, mean, marker="o", markersize=3, color=color, label=f"{row['optimizer']} (n={row['n']})")
    if any(finite(sd) for sd in curve["sd"]):
        sd = [v if finite(v) else 0.0 for v in curve["sd"]]
        low, high = (
            [m - v for m, v in zip(mean, sd, strict=True)],
            [m + v for m, v in zip(mean, sd, strict=True)],
        )
        ax.fill_between(steps, low, high, color=color, alpha=0.2)
