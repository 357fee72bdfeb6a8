"""The report's trade-off figure (``tradeoff.png``): forgetting against model utility, per model group.

One point per group (target, oracle, each method × optimizer × attack) at its mean over seeds, with
± 1 sd error bars; forget_quality on a log scale when the benchmark has it, else a panel per forget
metric it has. Never an empty chart: with nothing to plot, the reason is drawn in the figure.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnflow.io import atomic_file
from unlearnflow.report import WARN
from unlearnflow.spread import finite, point_label

# The report's logger: its warnings are the report stage's, whichever module draws.
log = logging.getLogger("unlearnflow.report")

# tradeoff.png's y axes, each against model_utility: forget_quality alone when the rows have it (TOFU);
# otherwise one panel per metric of FALLBACK_PANELS that they have (MUSE: privleak; custom data, which
# has no truth ratios and hence no forget_quality: forget prob, ROUGE and the per-fact leak count).
X_KEY = "model_utility"
FALLBACK_PANELS = ("privleak", "forget_prob", "forget_rouge", "facts_leaked")
PANEL_TEXT = {  # y metric -> (axis label, title)
    "forget_quality": (
        "forget_quality (KS p vs oracle, log): geometric mean, bars ± 1 sd of log10",
        "Forget quality vs model utility",
    ),
    "privleak": ("privleak (0 = oracle, −100 = forget set recognised)", "Privacy leakage vs model utility"),
    "forget_prob": ("forget_prob: exp(−avgNLL) of forget answers (lower = forgotten)", "Forget probability"),
    "forget_rouge": ("forget_rouge: ROUGE-L recall of greedy answers (lower = forgotten)", "Forget ROUGE-L"),
    "facts_leaked": ("facts_leaked: forget facts still generated (lower = better)", "Leaked facts"),
}
_STYLE = {
    "target": {"marker": "X", "color": "tab:red", "s": 90},
    "oracle": {"marker": "*", "color": "tab:green", "s": 140},
    "unlearned": {"marker": "o", "color": "tab:blue", "s": 40},
}


def _has(group: dict, key: str) -> bool:
    return finite(group["mean"].get(key))


def tradeoff_panels(groups: Sequence[dict]) -> list[str]:
    """The y metrics of ``tradeoff.png``: ``["forget_quality"]`` when some row has it together with
    model_utility; else each of ``FALLBACK_PANELS`` that some row has with model_utility; ``[]`` when
    no row has anything to plot."""

    def plottable(key: str) -> bool:
        return any(_has(g, X_KEY) and _has(g, key) for g in groups)

    if plottable("forget_quality"):
        return ["forget_quality"]
    return [k for k in FALLBACK_PANELS if plottable(k)]


def nothing_to_plot(groups: Sequence[dict]) -> str:
    """Why ``tradeoff_panels`` is empty, naming exactly what is missing (one line)."""
    ys = ("forget_quality", *FALLBACK_PANELS)
    has_x = any(_has(g, X_KEY) for g in groups)
    has_y = [k for k in ys if any(_has(g, k) for g in groups)]
    if not groups:
        return "nothing to plot: no evaluated model"
    if not has_x:
        return f"nothing to plot: no model has {X_KEY}" + ("" if has_y else f", nor any of {', '.join(ys)}")
    if not has_y:
        return f"nothing to plot: no model has any of {', '.join(ys)}"
    return f"nothing to plot: no model has {X_KEY} together with {', '.join(has_y)}"


def _missing_warning(group: dict, panels: Sequence[str]) -> str | None:
    """The one-line warning for a row left out of some panel: exactly the metrics it lacks."""
    absent = [k for k in (X_KEY, *panels) if not _has(group, k)]
    if not absent:
        return None
    where = "" if X_KEY in absent or len(panels) == 1 else f" on the {', '.join(absent)} panel"
    return f"{point_label(group)}: no {', '.join(absent)}; not plotted{where}"


def _point(group: dict, y_key: str) -> tuple[float, float, float | None, Any, bool]:
    """x, y, x error, y error (``errorbar``'s [[down], [up]]) and whether the y is a zero p-value."""
    x, xerr = float(group["mean"][X_KEY]), group["sd"].get(X_KEY, math.nan)
    if y_key == "forget_quality":
        lm, ls = group["log10_mean"][y_key], group["log10_sd"].get(y_key, math.nan)
        y = 10.0**lm
        yerr = [[y - 10.0 ** (lm - ls)], [10.0 ** (lm + ls) - y]] if finite(ls) else None
        zero = group["zeros"].get(y_key, 0) > 0
    else:
        y, sd = float(group["mean"][y_key]), group["sd"].get(y_key, math.nan)
        yerr, zero = ([[sd], [sd]] if finite(sd) else None), False
    return x, y, xerr if finite(xerr) else None, yerr, zero


def _draw_panel(ax: Any, groups: Sequence[dict], y_key: str) -> None:
    """One scatter of model_utility against ``y_key``, a point per row that has both."""
    points = [(g, *_point(g, y_key)) for g in groups if _has(g, X_KEY) and _has(g, y_key)]
    fine = [y for _, _, y, _, _, zero in points if not zero and y > 0]
    floor = min(fine) / 10 if fine else 1e-300
    seen: set[str] = set()
    for g, x, y, xerr, yerr, zero in points:
        kind = g["model"]
        st = dict(_STYLE[kind])
        if kind == "unlearned" and g.get("attack") not in (None, "none"):
            st.update(marker="^", color="tab:orange")
            legend_name = "unlearned + attack"
        else:
            legend_name = kind
        y_at = max(y, floor) if zero else y
        if xerr is not None or yerr is not None:
            ax.errorbar(
                [x],
                [y_at],
                xerr=xerr,
                yerr=None if zero else yerr,
                fmt="none",
                ecolor=st["color"],
                alpha=0.6,
                capsize=3,
                zorder=2,
            )
        ax.scatter(
            [x],
            [y_at],
            marker=st["marker"],
            s=st["s"],
            facecolors="none" if zero else st["color"],
            edgecolors=st["color"],
            label=None if legend_name in seen else legend_name,
            zorder=3,
        )
        seen.add(legend_name)
        text = point_label(g) + (f" n={g['n']}" if g["n"] > 1 else "") + (" (fq=0)" if zero else "")
        text += f" {WARN}" if g["flagged_seeds"] else ""
        ax.annotate(text, (x, y_at), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("model_utility (higher = better; bars: ± 1 sd over seeds)")
    if y_key == "forget_quality":
        ax.set_yscale("log")
    label, title = PANEL_TEXT[y_key]
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if seen:
        ax.legend(loc="best", fontsize=8)


def plot_tradeoff(groups: Sequence[dict], path: Path) -> list[str]:
    """Save ``tradeoff.png``: model_utility (x) against what the rows have (``tradeoff_panels``), one
    panel per y metric, one point per row with error bars of ± 1 sd over seeds.

    forget_quality is drawn on a log scale (its geometric mean, bars ± 1 sd of log10); a row whose
    forget_quality is 0 in some seed is drawn hollow at no lower than a tenth of the smallest other
    point. Benchmarks without forget quality get a panel each for privleak (MUSE: −100 = the forget
    set fully recognised, 0 = like the oracle), forget_prob, forget_rouge and facts_leaked, as present
    (custom data). A row with a flagged seed is labelled ⚠; a row missing a coordinate is left out of
    that panel, with a warning naming the metric. With nothing to plot the PNG still is written,
    saying why in it and in the log: ``dvc.yaml`` declares it as a plot, and DVC reports a missing
    plot file as an error of every ``dvc plots show``. Written atomically at 120 dpi.

    Returns:
        The y metrics plotted, one per panel; ``[]`` for the "nothing to plot" image.
    """
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    panels = tradeoff_panels(groups)
    if not panels:
        reason = nothing_to_plot(groups)
        log.warning("tradeoff.png: %s", reason)
        fig = Figure(figsize=(8, 3))
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=11)
    else:
        for g in groups:
            warning = _missing_warning(g, panels)
            if warning is not None:
                log.warning("%s", warning)
        cols = min(len(panels), 2)
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(8, 6) if len(panels) == 1 else (6.5 * cols, 5 * rows))
        for i, y_key in enumerate(panels):
            _draw_panel(fig.add_subplot(rows, cols, i + 1), groups, y_key)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return panels
