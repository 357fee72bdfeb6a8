"""The numbers measured against the oracle (retain) model, and ``model_utility``.

``relative_metrics`` turns one model's ``EvalResult`` (``suite``) and the oracle's per-sample rows
into ``forget_quality``, ``model_utility``, ``mia_reference`` and ``privleak``; ``check_metrics``
fails fast, before any model loads, on a metric list that cannot give the benchmark's numbers.
Definitions: ALGORITHMS.md §5, docs/metrics.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unlearnflow.data.benchmark import Layout
from unlearnflow.errors import ConfigError, DataError
from unlearnflow.metrics import mia, tofu
from unlearnflow.metrics.split_metrics import check_metric_names
from unlearnflow.metrics.suite import EvalResult

log = logging.getLogger(__name__)


def check_metrics(layout: Layout, metrics: Sequence[str]) -> None:
    """Fail fast, before any model loads, on a metric list that cannot give the benchmark's numbers.

    Unknown names are a ``ConfigError`` listing the known ones; so is a ``model_utility``
    component (``Layout.utility_components``) whose metric is not requested, named with the
    metric to add: model_utility is never a harmonic mean over a subset. A forget-quality split
    without truth-ratio inputs is a ``DataError``. (That forget_quality needs ``truth_ratio`` is
    a warning from ``relative_metrics``, where the number goes missing.)
    """
    check_metric_names(metrics)
    missing = [key for key in layout.utility_components() if _component_metric(layout, key) not in metrics]
    if missing:
        raise ConfigError(_missing_utility_message(layout, missing))
    fq = layout.forget_quality
    if fq is not None:
        info = layout.info[fq]
        if not (info.kind == "options" or (info.kind == "qa" and info.perturbed)):
            raise DataError(
                f"split {fq!r} is the benchmark's forget-quality split but its rows lack "
                "paraphrased_answer / perturbed_answer, so it has no truth ratios"
            )


def _component_metric(layout: Layout, key: str) -> str:
    """The metric name of a ``<split>_<metric>`` utility key (split names may contain ``_``)."""
    split = max((n for n in layout.info if key.startswith(n + "_")), key=len)
    return key[len(split) + 1 :]


def _missing_utility_message(layout: Layout, missing: Sequence[str]) -> str:
    wanted = sorted({_component_metric(layout, k) for k in missing})
    return (
        f"model_utility needs {', '.join(missing)} (fixed by the benchmark's utility splits) but "
        f"evaluate.metrics lacks {', '.join(wanted)}; add {'it' if len(wanted) == 1 else 'them'}"
    )


def relative_metrics(
    result: EvalResult,
    layout: Layout,
    oracle: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    metrics: Sequence[str],
    *,
    oracle_dir: str | Path | None = None,
) -> dict[str, float]:
    """The numbers measured against the oracle (retain) model, and ``model_utility``.

    Args:
        result: this model's ``EvalResult``.
        layout: the benchmark layout.
        oracle: the oracle's per-sample rows (split -> rows with ``index``, ``truth_ratio``,
            ``nll``, ``mia_min_k``), as its own evaluation wrote them; pass this model's own
            ``result.per_sample`` to evaluate the oracle against itself; None: no oracle.
        metrics: the requested metric names.
        oracle_dir: where the oracle's ``<split>.jsonl`` files were read from (named in errors).

    Returns:
        ``forget_quality`` (KS p-value of forget truth ratios vs the oracle's; NaN without an
        oracle or a forget-quality split, and, with a logged warning, when ``truth_ratio`` is not
        requested), ``model_utility`` (harmonic mean of ``result.utility``, the components the
        benchmark fixes; NaN if it has none), and when requested ``mia_reference`` (AUC of
        avgNLL_oracle − avgNLL_model) and ``privleak`` (Min-K% AUC relative to the oracle's; 0.5
        reference without oracle). The per-sample ``mia_reference`` scores are added to
        ``result.per_sample``'s member and non-member rows, so the written per-sample files carry them.

    Raises:
        DataError: the oracle's forget-quality rows lack truth ratios (naming split and file);
            a model_utility component is NaN.
        ConfigError: a model_utility component was not computed (its metric not requested).
    """
    out: dict[str, float] = {"forget_quality": _forget_quality(result, layout, oracle, metrics, oracle_dir)}
    missing = [k for k in result.utility if k not in result.aggregates]
    if missing:
        raise ConfigError(_missing_utility_message(layout, missing))
    undefined = [k for k in result.utility if math.isnan(result.aggregates[k])]
    if undefined:
        raise DataError(f"model_utility: {', '.join(undefined)} is NaN (no scored rows?)")
    parts = {k: result.aggregates[k] for k in result.utility}
    out["model_utility"] = tofu.model_utility(parts) if parts else math.nan
    if not layout.mia or not all(n in result.per_sample for n in layout.mia):
        return out
    members, nonmembers = (result.per_sample[n] for n in layout.mia)
    if "mia_reference" in metrics:
        if oracle is None:
            out["mia_reference"] = math.nan
        else:
            scores = [_reference(result.per_sample[n], oracle.get(n, []), n) for n in layout.mia]
            out["mia_reference"] = mia.auc(*scores)
            for n, sc in zip(layout.mia, scores, strict=True):
                for rec, v in zip(result.per_sample[n], sc, strict=True):
                    rec["mia_reference"] = float(v)
    if "privleak" in metrics:
        auc_model = mia.auc(_column(members, "mia_min_k"), _column(nonmembers, "mia_min_k"))
        auc_oracle = None
        if oracle is not None:
            om, on = (_column(oracle.get(n, []), "mia_min_k") for n in layout.mia)
            if om is None or on is None:
                raise DataError("the oracle's per-sample rows lack mia_min_k (evaluate it with privleak too)")
            auc_oracle = mia.auc(om, on)
        out["privleak"] = mia.privleak(auc_model, auc_oracle)
    return out


def _forget_quality(
    result: EvalResult,
    layout: Layout,
    oracle: Mapping[str, Sequence[Mapping[str, Any]]] | None,
    metrics: Sequence[str],
    oracle_dir: str | Path | None,
) -> float:
    """KS p-value of the forget truth ratios against the oracle's; NaN only where it is undefined
    (no forget-quality split, no oracle) or, loudly, where ``truth_ratio`` was not requested."""
    split = layout.forget_quality
    if split is None:
        return math.nan
    if "truth_ratio" not in metrics:
        log.warning(
            "forget_quality is NOT computed: the benchmark's forget-quality split %r needs truth_ratio, "
            "which evaluate.metrics does not request (add truth_ratio to evaluate.metrics)",
            split,
        )
        return math.nan
    model_tr = _column(result.per_sample.get(split, []), "truth_ratio")
    if model_tr is None:
        raise DataError(f"split {split!r}: this model's per-sample rows lack truth_ratio")
    if oracle is None:
        return math.nan
    oracle_tr = _column(oracle.get(split, []), "truth_ratio")
    if oracle_tr is None:
        where = Path(oracle_dir) / f"{split}.jsonl" if oracle_dir is not None else f"{split}.jsonl"
        raise DataError(
            f"the oracle's per-sample rows of forget-quality split {split!r} ({where}) lack truth_ratio "
            "(evaluate the oracle with truth_ratio too)"
        )
    return tofu.forget_quality(model_tr, oracle_tr)


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    if not rows or key not in rows[0]:
        return None
    return np.array([r[key] for r in rows], dtype=np.float64)


def _reference(
    rows: Sequence[Mapping[str, Any]], oracle_rows: Sequence[Mapping[str, Any]], split: str
) -> np.ndarray:
    by_index = {r["index"]: r.get("nll") for r in oracle_rows}
    missing = [r["index"] for r in rows if by_index.get(r["index"]) is None]
    if missing:
        raise DataError(
            f"the oracle's per-sample {split!r} rows lack nll for {len(missing)} rows (first index {missing[0]}); "
            "evaluate both with the same max_samples and seed"
        )
    return mia.reference_score(
        np.array([r["nll"] for r in rows]), np.array([by_index[r["index"]] for r in rows])
    )
