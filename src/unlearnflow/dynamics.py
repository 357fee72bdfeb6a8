"""What the unlearn runs did, for the report: the methods table and the per-step diagnostic plots.

Input: one ``unlearned/<method>-<optimizer>-s<seed>/`` directory per unlearn item, holding
``item.json`` (what the stage ran: resolved lr / epochs, the method's and optimizer's arguments,
steps, wall time) and ``steps.jsonl`` (one logged row per step). Items written before these files
existed (or adopted models) are skipped with a warning, never an error: the metrics still report.

Diagnostics are the per-step quantities a method steers by; each method that logs them gets a figure
with one panel per quantity and one line per optimizer × seed: PDU's dual variable λ and its
constraint L_r − ε (ALGORITHMS.md §2 "primal_dual": the λ trajectory is the method's diagnostic),
OFMU's penalty ρ and gradient similarity (§2 "bilevel").
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnflow.io import atomic_file

log = logging.getLogger(__name__)

# Per-step keys plotted when a run logs them (titles say how to read them).
DIAGNOSTICS: dict[str, str] = {
    "lambda": "λ (dual variable): rises while L_r > ε",
    "constraint": "L_r − ε (≤ 0: retain constraint holds)",
    "rho": "ρ (outer penalty)",
    "similarity": "sim(∇L_f, ∇L_r)",
    "inner_gain": "inner-loop gain in L_f",
}
# Also drawn beside the diagnostics, for context.
CONTEXT = ("forget_loss", "retain_loss")


def read_run(item_dir: Path) -> dict[str, Any] | None:
    """``item.json`` and the step rows of one unlearn item, or None when it lacks them."""
    config, steps = item_dir / "item.json", item_dir / "steps.jsonl"
    if not (config.is_file() and steps.is_file()):
        log.warning(
            "%s: no item.json / steps.jsonl (older or adopted run): not in the methods table", item_dir
        )
        return None
    try:
        cfg = json.loads(config.read_text())
        rows = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable run log (%s): not in the methods table", item_dir, e)
        return None
    return {"config": cfg, "rows": rows}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _args(mapping: dict[str, Any]) -> str:
    shown = {k: v for k, v in mapping.items() if k not in ("name", "lr", "epochs") and v is not None}
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(shown.items())) or "–"


def methods_table(runs: Sequence[tuple[str, str, int, dict[str, Any]]]) -> list[str]:
    """Markdown lines: one row per method × optimizer with what ran (over its seeds).

    Args:
        runs: ``(method, optimizer, seed, run)`` with ``run`` from :func:`read_run`.

    Columns: method, optimizer, seeds, lr, epochs (and the params key each came from), optimizer
    steps, wall time per run (median over seeds), the method's and the optimizer's arguments.
    """
    groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    for method, optimizer, seed, run in runs:
        groups.setdefault((method, optimizer), []).append((seed, run))
    if not groups:
        return []
    lines = [
        "## Methods",
        "",
        "What each unlearn item ran (`item.json` of `unlearned/<method>-<optimizer>-s<seed>`); lr and "
        "epochs after per-method / per-optimizer overrides, with the params key they came from.",
        "",
        "| method | optimizer | seeds | lr | epochs | steps | wall s (median) | method args | optimizer args |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, optimizer), members in groups.items():
        cfg = members[0][1]["config"]
        train, source = cfg.get("unlearn", {}), cfg.get("schedule_from", {})
        lr = f"{_fmt(train.get('lr'))} ({source.get('lr', 'unlearn.lr')})"
        epochs = f"{_fmt(train.get('epochs'))} ({source.get('epochs', 'unlearn.epochs')})"
        steps = sorted({int(r["config"].get("steps", 0)) for _, r in members})
        wall = statistics.median(float(r["config"].get("wall_time_s", math.nan)) for _, r in members)
        lines.append(
            f"| {method} | {optimizer} | {', '.join(str(s) for s, _ in sorted(members, key=lambda m: m[0]))} "
            f"| {lr} | {epochs} | {'/'.join(map(str, steps))} | {wall:.1f} "
            f"| {_args(cfg.get('method', {}))} | {_args(cfg.get('optimizer', {}))} |"
        )
    return [*lines, ""]


def plot_dynamics(method: str, runs: Sequence[tuple[str, int, list[dict[str, Any]]]], path: Path) -> bool:
    """Save one figure of ``method``'s per-step diagnostics, one line per optimizer × seed.

    Args:
        method: the method name (title).
        runs: ``(optimizer, seed, step rows)``.
        path: where the PNG goes (written atomically).

    Returns:
        False (and nothing written) when no run logs any key of ``DIAGNOSTICS``.
    """
    logged = {k for _, _, rows in runs for row in rows for k in row}
    keys = [k for k in DIAGNOSTICS if k in logged]
    if not keys:
        return False
    keys += [k for k in CONTEXT if k in logged]
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    fig = Figure(figsize=(5.0 * min(3, len(keys)), 3.6 * math.ceil(len(keys) / 3)))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / 3), min(3, len(keys)), i + 1)
        for optimizer, seed, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"{optimizer} s{seed}", linewidth=1.2)
        if key == "constraint":
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(DIAGNOSTICS.get(key, key), fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(f"{method}: training dynamics per seed", fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True
