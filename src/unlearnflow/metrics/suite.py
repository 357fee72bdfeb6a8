"""The metric suite on one model: score each split once, then compute every requested metric.

``evaluate_splits`` walks a benchmark's evaluated splits. On each it picks the metrics of
``split_metrics.METRICS`` that apply (by the split's kind and role), runs the model over the split
once (``scored_split.score_split``), computes those metrics and, on the member / non-member splits,
the MIA scores from the result. It returns the per-split aggregates, the per-sample rows and each
MIA attack's ROC-AUC as an ``EvalResult``. The oracle-relative numbers (``mia_reference``,
``privleak``, ``forget_quality``) and ``model_utility`` come from ``relative.relative_metrics``.
Definitions: ALGORITHMS.md §5, docs/metrics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from unlearnflow.data.benchmark import PERTURBED_COLUMNS, Layout, SplitInfo
from unlearnflow.errors import DataError
from unlearnflow.metrics import mia
from unlearnflow.metrics.scored_split import ScoredSplit, SuiteOptions, score_split
from unlearnflow.metrics.scoring import eval_mode, grad_norm_scores
from unlearnflow.metrics.split_metrics import (
    METRICS,
    MIA_ATTACKS,
    RELATIVE,
    MetricValues,
    check_metric_names,
    mia_needs,
    mia_scores,
)

log = logging.getLogger(__name__)

CARRIED_FIELDS = ("author", "attribute")  # copied from a split row into its per-sample output row


@dataclass
class EvalResult:
    """The suite's output for one model.

    Attributes:
        aggregates: ``"<split>_<metric>"`` -> value (e.g. ``forget_prob``, ``wmdp-bio_mcq_accuracy``)
            and ``"mia_<attack>"`` -> ROC-AUC (forget members vs holdout non-members).
        per_sample: split -> one dict per evaluated row: ``index`` (row index in the full split),
            the row's identifying text, ``nll`` (avgNLL of the main target, when scored),
            ``generation`` (when generated), one key per split metric (raw values: the truth
            ratio itself, not its aggregate transform), one per MIA score, and the row's
            ``author`` / ``attribute`` when present.
        utility: the aggregate keys that enter ``model_utility``: ``Layout.utility_components()``,
            fixed by the benchmark whichever metrics were requested.
    """

    aggregates: dict[str, float]
    per_sample: dict[str, list[dict]]
    utility: list[str]


def subsample(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``range(n)`` of size ``min(n, max_samples)``.

    A fresh ``np.random.default_rng(seed)`` per call, so a split's subset depends only on its
    size and the seed: every model evaluated with one seed sees the same rows.
    """
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


_IDENTITY = {
    "text": ("text",),
    "completion": ("prompt", "gt"),
    "mcq": ("question", "answer"),
}


def _per_sample_rows(s: ScoredSplit, values: Mapping[str, MetricValues]) -> list[dict]:
    out = []
    for i, row in enumerate(s.rows):
        rec: dict[str, Any] = {"index": int(s.indices[i])}
        rec.update({k: row[k] for k in _IDENTITY.get(s.kind, ("question", "answer"))})
        if s.target is not None:
            rec["nll"] = s.target[i].avg_nll
        if s.generations is not None:
            rec["generation"] = s.generations[i]
        rec.update({m: float(v.per_sample[i]) for m, v in values.items()})
        rec.update({m: float(v[i]) for m, v in s.mia_scores.items()})
        rec.update({k: row[k] for k in CARRIED_FIELDS if k in row})
        out.append(rec)
    return out


def evaluate_splits(
    model: torch.nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[dict]],
    layout: Layout,
    *,
    metrics: Sequence[str],
    device: torch.device | str,
    opts: SuiteOptions = SuiteOptions(),
) -> EvalResult:
    """Evaluate one model on every evaluated split of a benchmark (ALGORITHMS.md §5).

    Args:
        model: a causal LM on ``device``; put in eval mode for the call, its mode restored after.
        tokenizer: its tokenizer.
        splits: split name -> rows, for every split in ``layout.evaluated()`` (others are ignored).
        layout: kinds, roles and MIA splits of the benchmark.
        metrics: names from ``known_metrics()``; each runs where it applies.
        device: where inputs go.
        opts: batch size, token caps, generation lengths, MIA k, subsampling.

    Returns:
        ``EvalResult``. The oracle-relative metrics come from ``relative_metrics``.

    Raises:
        ConfigError: an unknown metric name.
        ValueError: an empty split, or rows of inconsistent shape.
    """
    check_metric_names(metrics)
    if opts.max_new_tokens is None:  # null in params: the benchmark's default cap (TOFU: the reference's 200)
        opts = replace(opts, max_new_tokens=layout.max_new_tokens)
    requested = set(metrics)
    split_metrics = {m: METRICS.get(m) for m in dict.fromkeys(metrics) if m in METRICS}
    mia_requested = requested & {*MIA_ATTACKS, *RELATIVE}
    mia_splits = set(layout.mia or ()) if mia_requested else set()
    if mia_requested and not layout.mia:
        log.warning("%s", missing_mia_warning(mia_requested, layout))
    aggregates: dict[str, float] = {}
    per_sample: dict[str, list[dict]] = {}
    scored: dict[str, ScoredSplit] = {}
    with eval_mode(model):
        for name in layout.evaluated():
            info = layout.info[name]
            all_rows = splits[name]
            if len(all_rows) == 0:
                raise DataError(f"split {name!r} is empty")
            _check_perturbed_flag(name, info, all_rows)
            indices = subsample(len(all_rows), opts.max_samples, opts.seed)
            if opts.exclude.get(name):
                indices = indices[~np.isin(indices, sorted(opts.exclude[name]))]
                if len(indices) == 0:
                    raise DataError(f"split {name!r}: every row is excluded (a relearning pool?)")
            rows = [all_rows[i] for i in indices]
            applicable = (
                {m: spec for m, spec in split_metrics.items() if spec.applies(info.kind, info.role, rows)}
                if info.role != "mia"
                else {}
            )
            needs = set().union(*(spec.needs[info.kind] for spec in applicable.values()))
            if name in mia_splits:
                needs |= mia_needs(mia_requested) - {"grad"}
            if not needs:
                continue
            log.info(
                "evaluating %s (%s/%s, %d of %d rows): %s",
                name,
                info.kind,
                info.role,
                len(rows),
                len(all_rows),
                list(applicable),
            )
            s = score_split(
                model,
                tokenizer,
                name,
                info.kind,
                info.role,
                rows,
                indices,
                needs=frozenset(needs),
                opts=opts,
                device=device,
            )
            if name in mia_splits:
                s.mia_scores = mia_scores(s, mia_requested, opts, tokenizer)
                if "mia_grad_norm" in mia_requested:
                    s.mia_scores["mia_grad_norm"] = grad_norm_scores(
                        model,
                        s.target_examples,
                        eos_token_id=tokenizer.eos_token_id,
                        device=device,
                        p=opts.grad_norm_p,
                    )
            values = {m: spec.compute(s) for m, spec in applicable.items()}
            keys = {m: f"{name}_{m}" for m in values}
            aggregates.update({keys[m]: v.aggregate for m, v in values.items()})
            scored[name] = s
            per_sample[name] = _per_sample_rows(s, values)
    if layout.mia and mia_splits and all(n in scored for n in layout.mia):
        members, nonmembers = (scored[n] for n in layout.mia)
        for attack in MIA_ATTACKS:
            if attack in requested:
                aggregates[attack] = mia.auc(members.mia_scores[attack], nonmembers.mia_scores[attack])
    return EvalResult(aggregates=aggregates, per_sample=per_sample, utility=layout.utility_components())


# The splits data.custom.load names, and what it trains the target on: how its layout is recognised
# (the layout carries no benchmark name; TOFU trains on retain_train, WMDP on its corpora).
CUSTOM_SPLITS = frozenset({"forget", "retain", "holdout", "verbmem_forget"})
CUSTOM_TARGET_TRAIN = ["forget", "retain"]


def is_custom_layout(layout: Layout) -> bool:
    """Whether ``layout`` is a user's own data (``benchmark.name: custom``, ``data.custom``)."""
    return set(layout.info) <= CUSTOM_SPLITS and layout.train.get("target") == CUSTOM_TARGET_TRAIN


def missing_mia_warning(requested: Iterable[str], layout: Layout) -> str:
    """The one-line warning when membership-inference metrics are requested but the benchmark has no
    member / non-member splits (ALGORITHMS.md §5: AUC of forget vs holdout). On custom data it says
    how to get them: a holdout file of similar data the model never trained on."""
    line = f"metrics {sorted(requested)} need member / non-member splits, which this benchmark lacks"
    if is_custom_layout(layout):
        line += (
            "; a holdout file (benchmark.custom.holdout: data like the forget set that the model never "
            "trained on, rows as in the forget file) would enable them"
        )
    return line


def _check_perturbed_flag(name: str, info: SplitInfo, rows: Sequence[Mapping[str, Any]]) -> None:
    """The layout's ``perturbed`` flag of a qa split agrees with its rows (it fixes model_utility)."""
    if info.kind != "qa" or info.role not in ("forget", "utility"):
        return
    has = all(r.keys() >= PERTURBED_COLUMNS for r in rows)
    if has != info.perturbed:
        raise DataError(
            f"split {name!r}: the rows {'carry' if has else 'lack'} paraphrased_answer / perturbed_answer "
            f"but the benchmark layout says perturbed={info.perturbed} (splits from an older prepare? rerun it)"
        )
