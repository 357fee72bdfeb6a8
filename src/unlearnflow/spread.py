"""Statistics over unlearn seeds: rows grouped by method × optimizer × attack (mean, sample sd), and
which pairs of rows their spreads separate.

One run is not a result: training floats differ across CPUs and grow through training, so a
conclusion (which method forgets more, at what utility) is only reported as holding when the seeds
agree. The screen is deliberately simple: two rows are *separated* on a metric when their mean ± sd
intervals do not overlap. With n = 3 that is a rough check, not a significance test; the report says so.

forget_quality is a KS p-value that spans tens of orders of magnitude (the target's is ~1e-33, a good
unlearning run's ~1e-2), where an arithmetic mean is the largest seed and ± sd straddles 0; it is
therefore also aggregated on log10 (mean of log10 = log of the geometric mean) and compared there.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from itertools import combinations
from typing import Any

ID_KEYS = ("model", "method", "optimizer", "attack", "seed")
GROUP_KEYS = ("model", "method", "optimizer", "attack")
RESERVED = (*ID_KEYS, "health")
# The metrics whose pairwise separation the report states (when the rows have them).
COMPARED_METRICS = ("forget_quality", "model_utility", "privleak", "forget_prob", "forget_truth_ratio")
LOG_METRICS = ("forget_quality",)
# A p-value of exactly 0 is an underflow: take log10 of the smallest positive normal double instead.
P_FLOOR = sys.float_info.min


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); sd is NaN for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def log10_p(value: float) -> float:
    """log10 of a p-value, with 0 taken as ``P_FLOOR`` (an underflow, not an impossibility)."""
    return math.log10(max(value, P_FLOOR))


def group_rows(rows: Sequence[dict]) -> list[dict]:
    """Group the rows by ``model, method, optimizer, attack`` over their seeds (input order kept).

    Each group: the four keys, ``n``, ``seeds``, ``mean`` and ``sd`` (metric → value, NaN where any
    seed lacks the metric), for forget_quality ``log10_mean`` / ``log10_sd`` and ``zeros`` (seeds
    whose p-value is 0, taken as ``P_FLOOR``), ``health_recorded`` (seeds with a health.json),
    ``flagged_seeds`` and ``health_flags`` (``"s<seed>: <flag>"``).
    """
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        buckets.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    groups = []
    for key, members in buckets.items():
        metrics = sorted({k for r in members for k in r} - set(RESERVED))
        group: dict[str, Any] = {**dict(zip(GROUP_KEYS, key, strict=True)), "n": len(members)}
        group["seeds"] = [r.get("seed") for r in members]
        group["mean"], group["sd"], group["log10_mean"], group["log10_sd"] = {}, {}, {}, {}
        group["zeros"] = {}
        for m in metrics:
            values = [r.get(m, math.nan) for r in members]
            complete = all(finite(v) for v in values)
            group["mean"][m], group["sd"][m] = mean_sd(values) if complete else (math.nan, math.nan)
            if m in LOG_METRICS:
                logs = [log10_p(v) for v in values] if complete else []
                group["log10_mean"][m], group["log10_sd"][m] = mean_sd(logs)
                group["zeros"][m] = sum(v == 0 for v in values)
        recorded = [r for r in members if r.get("health") is not None]
        flagged = [r for r in recorded if r["health"]]
        group["health_recorded"] = len(recorded)
        group["flagged_seeds"] = [r.get("seed") for r in flagged]
        group["health_flags"] = [f"s{r.get('seed')}: {f}" for r in flagged for f in r["health"]]
        groups.append(group)
    return groups


def interval(group: dict, metric: str) -> tuple[float, float] | None:
    """``mean ± sd`` of ``metric`` (on log10 for forget_quality); a point when n = 1; None if missing."""
    stats = ("log10_mean", "log10_sd") if metric in LOG_METRICS else ("mean", "sd")
    mean, sd = (group[s].get(metric, math.nan) for s in stats)
    if not finite(mean):
        return None
    half = sd if finite(sd) else 0.0
    return mean - half, mean + half


def compare_groups(groups: Sequence[dict], metrics: Sequence[str] = COMPARED_METRICS) -> list[dict]:
    """For each metric and each pair of rows: are they separated by their spreads?

    ``status``: ``separated`` (the mean ± sd intervals do not overlap; ``higher`` names the row with
    the larger mean), ``overlap`` (they overlap or touch: the seeds do not tell the rows apart), or
    ``no spread`` (both rows have n = 1: a single run cannot say). Pairs where either row lacks the
    metric are left out. forget_quality is compared on log10 (``scale``).
    """
    out = []
    for metric in metrics:
        for a, b in combinations(groups, 2):
            ia, ib = interval(a, metric), interval(b, metric)
            if ia is None or ib is None:
                continue
            if a["n"] < 2 and b["n"] < 2:
                status = "no spread"
            else:
                status = "overlap" if max(ia[0], ib[0]) <= min(ia[1], ib[1]) else "separated"
            higher = (
                (point_label(a) if sum(ia) > sum(ib) else point_label(b)) if status == "separated" else None
            )
            out.append(
                {
                    "metric": metric,
                    "scale": "log10" if metric in LOG_METRICS else "linear",
                    "a": point_label(a),
                    "b": point_label(b),
                    "a_interval": list(ia),
                    "b_interval": list(ib),
                    "status": status,
                    "higher": higher,
                }
            )
    return out


def point_label(row: dict) -> str:
    """``method/optimizer/attack`` with missing parts left out; the model kind for target and oracle."""
    if row["model"] != "unlearned":
        return row["model"]
    return "/".join(str(row[k]) for k in GROUP_KEYS[1:] if row.get(k) is not None) or "unlearned"


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
