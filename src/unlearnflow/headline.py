"""The pipeline's DVC metrics: a short headline per model group, for `dvc exp show`.

Every evaluated model writes its full metric set (``eval/<model>/metrics.json``, two dozen numbers)
and the report holds their means and spreads (``reports/summary.json``). Declared as DVC metrics,
the full sets made `dvc exp show` one column per metric per model (157 on a small custom run), which
no terminal shows. So DVC tracks only the headline written here, a handful of numbers per model group.

Layout: ``{metric: {group: mean over seeds}}``, metric first, because `dvc exp show --keep REGEX`
matches column names from their start: ``--keep model_utility`` keeps ``model_utility.target``,
``model_utility.grad_diff-adamw`` and so on. Groups are ``target``, ``oracle``, ``<method>-<optimizer>``
(unattacked), ``<method>-<optimizer>-<attack>`` and the controls ``<target|oracle>-<attack>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# The headline of every benchmark: the forget split's answer probability, the one-number summaries
# (forget_quality, model_utility, privleak), and the per-fact leak count; MUSE's and WMDP's forget
# and utility scores by their suffix. A metric a benchmark lacks is simply absent.
HEADLINE = ("forget_prob", "forget_quality", "model_utility", "privleak", "facts_leaked")
HEADLINE_SUFFIXES = ("_knowmem", "_verbmem", "_mcq_accuracy")


def is_headline(metric: str) -> bool:
    return metric in HEADLINE or metric.endswith(HEADLINE_SUFFIXES)


def group_name(group: Mapping[str, Any], baseline: str | None) -> str:
    """``target`` / ``oracle``, ``<method>-<optimizer>`` for the unattacked baseline, else with ``-<attack>``."""
    if group["model"] != "unlearned":
        return (
            group["model"]
            if group.get("attack") in (None, baseline)
            else f"{group['model']}-{group['attack']}"
        )
    name = f"{group['method']}-{group['optimizer']}"
    return name if group.get("attack") in (None, baseline) else f"{name}-{group['attack']}"


def headline(
    groups: Sequence[Mapping[str, Any]], controls: Sequence[Mapping[str, Any]], baseline: str | None
) -> dict[str, dict[str, float]]:
    """The headline metrics of every group (``spread.group_rows``: mean over seeds) and control row
    (``report.collect_rows``: one model), ``{metric: {group: value}}``; NaNs are left out.

    Args:
        groups: target, oracle and each method × optimizer × attack, over seeds.
        controls: the attacked target / oracle rows (``attack`` set, ``model`` target or oracle).
        baseline: the attack name of the unattacked models (kind ``none``), named without a suffix.
    """
    out: dict[str, dict[str, float]] = {}
    entries = [(group_name(g, baseline), g["mean"]) for g in groups]
    entries += [(group_name(c, None), c) for c in controls]
    for name, values in entries:
        for metric, value in values.items():
            if is_headline(metric) and isinstance(value, int | float) and math.isfinite(value):
                out.setdefault(metric, {})[name] = float(value)
    return {m: dict(sorted(v.items())) for m, v in sorted(out.items())}
