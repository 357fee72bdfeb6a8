"""The comparison report: summary.json, report.md and the forget-quality / utility trade-off plot.

Input: one ``eval/<name>/`` directory per evaluated model, holding ``metrics.json`` (a flat dict of
floats, NaN allowed) and ``info.json`` (``model``: target | oracle | unlearned, and the ``method``,
``optimizer`` and ``attack`` that produced it, each possibly null).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import atomic_file, read_json, write_json

log = logging.getLogger(__name__)

ID_KEYS = ("model", "method", "optimizer", "attack")
LEAD_METRICS = ("forget_quality", "model_utility", "privleak")
MODELS = ("target", "oracle", "unlearned")
DASH = "–"

LEGEND = (
    "- **forget_quality**: KS-test p-value of the forget-set truth ratios against the oracle's "
    "(retrained without the forget set); higher = closer to the oracle.\n"
    "- **model_utility**: harmonic mean of the benchmark's utility-split metrics (TOFU: retain, real "
    "authors, world facts); higher = better.\n"
    "- **privleak**: Min-K% membership AUC relative to the oracle's, ×100; 0 = like the oracle, "
    "−100 = the forget set is recognised as training data. `mia_*`: ROC-AUC of forget vs holdout "
    "(0.5 = indistinguishable). Definitions: docs/metrics.md.\n"
    f"- Numbers to 4 significant digits; {DASH} = not available (NaN)."
)


def collect_rows(eval_dirs: Sequence[Path]) -> list[dict]:
    """One row per eval directory: ``model, method, optimizer, attack`` then every metric.

    Rows are ordered target first, oracle second, then unlearned models sorted by
    ``(method, optimizer, attack)`` (``None`` first, then the ``none`` attack, then the others).

    Args:
        eval_dirs: directories each holding ``metrics.json`` and ``info.json``.

    Returns:
        The rows, as plain dicts.

    Raises:
        UnlearnflowError: a file is missing or ``info.json`` names an unknown model kind.
    """
    rows = []
    for d in map(Path, eval_dirs):
        try:
            info, metrics = read_json(d / "info.json"), read_json(d / "metrics.json")
        except FileNotFoundError as e:
            raise UnlearnflowError(f"eval directory {d} is incomplete: {e.filename} is missing") from e
        if info.get("model") not in MODELS:
            raise UnlearnflowError(
                f"{d / 'info.json'}: model must be one of {MODELS}, got {info.get('model')!r}"
            )
        clash = set(ID_KEYS) & set(metrics)
        if clash:
            raise UnlearnflowError(f"{d / 'metrics.json'}: reserved keys {sorted(clash)}")
        rows.append({**{k: info.get(k) for k in ID_KEYS}, **metrics})
    return sorted(rows, key=_row_order)


def _row_order(row: dict) -> tuple:
    method, optimizer = ((row[k] is not None, row[k] or "") for k in ("method", "optimizer"))
    # The unattacked model ("none") leads its attacks: the baseline each attack is read against.
    attack = (row["attack"] not in (None, "none"), row["attack"] or "")
    return (MODELS.index(row["model"]), method, optimizer, attack)


def write_summary(rows: Sequence[dict], path: Path) -> None:
    """Write the rows as a JSON list (NaN as ``NaN``, keys sorted), atomically."""
    write_json(path, list(rows))


def metric_columns(rows: Sequence[dict]) -> list[str]:
    """The lead metrics (forget_quality, model_utility, privleak) that any row has, then every other
    metric found in any row, sorted."""
    present = {k for r in rows for k in r} - set(ID_KEYS)
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


def write_markdown(rows: Sequence[dict], path: Path) -> None:
    """Write ``report.md``: a title, a legend and one table row per evaluated model, atomically.

    Columns: ``model, method, optimizer, attack, forget_quality, model_utility``, then every other
    metric in sorted order.
    """
    columns = [*ID_KEYS, *metric_columns(rows)]
    lines = [
        "# Unlearning report",
        "",
        LEGEND,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ID_KEYS else "---:" for c in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(c, row.get(c)) for c in columns) + " |")
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def point_label(row: dict) -> str:
    """``method/optimizer/attack`` with missing parts left out; the model kind for target and oracle."""
    if row["model"] != "unlearned":
        return row["model"]
    return "/".join(str(row[k]) for k in ID_KEYS[1:] if row.get(k) is not None) or "unlearned"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def plot_tradeoff(rows: Sequence[dict], path: Path) -> None:
    """Save ``tradeoff.png``: model_utility (x) against forget_quality (y, log scale), one point per row.

    Benchmarks without forget quality (MUSE, WMDP, custom) plot privleak instead (linear scale:
    −100 = the forget set fully recognised, 0 = like the oracle). A forget_quality of 0 is drawn at
    the floor of the axis (a tenth of the smallest positive value, or 1e-300 when none is positive)
    with a hollow marker; rows with a missing coordinate are left out. Target and oracle get their
    own markers. Written atomically at 120 dpi.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    y_key = "forget_quality"
    if not any(_finite(r.get(y_key)) for r in rows) and any(_finite(r.get("privleak")) for r in rows):
        y_key = "privleak"
    points = []
    for row in rows:
        x, y = row.get("model_utility"), row.get(y_key)
        if not (_finite(x) and _finite(y)):
            log.warning("%s: no model_utility or %s, not plotted", point_label(row), y_key)
            continue
        points.append((row, float(x), float(y)))
    positive = [y for _, _, y in points if y > 0]
    floor = (min(positive) / 10 if positive else 1e-300) if y_key == "forget_quality" else -math.inf

    style = {
        "target": {"marker": "X", "color": "tab:red", "s": 90},
        "oracle": {"marker": "*", "color": "tab:green", "s": 140},
        "unlearned": {"marker": "o", "color": "tab:blue", "s": 40},
    }
    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot()
    seen: set[str] = set()
    for row, x, y in points:
        kind = row["model"]
        st = dict(style[kind])
        if kind == "unlearned" and row.get("attack") is not None:
            st.update(marker="^", color="tab:orange")
            legend = "unlearned + attack"
        else:
            legend = kind
        clipped = y_key == "forget_quality" and y <= 0
        ax.scatter(
            [x],
            [max(y, floor)],
            marker=st["marker"],
            s=st["s"],
            facecolors="none" if clipped else st["color"],
            edgecolors=st["color"],
            label=None if legend in seen else legend,
            zorder=3,
        )
        seen.add(legend)
        text = point_label(row) + (" (fq=0)" if clipped else "")
        ax.annotate(text, (x, max(y, floor)), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("model_utility (higher = better)")
    if y_key == "forget_quality":
        ax.set_yscale("log")
        ax.set_ylabel("forget_quality (KS p-value vs oracle, log)")
        ax.set_title("Forget quality vs model utility")
    else:
        ax.set_ylabel("privleak (0 = oracle, −100 = forget set recognised)")
        ax.set_title("Privacy leakage vs model utility")
    ax.grid(True, which="major", alpha=0.3)
    if seen:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
