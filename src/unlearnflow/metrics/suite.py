"""The TOFU metric suite on one model: score each split once, then compute every requested metric.

A split is scored by ONE ``score_qa`` call over all the (question, answer-variant) pairs its
metrics need and, if ``rouge`` is requested, ONE ``generate_greedy`` call; the results form a
``ScoredSplit`` and each metric in ``METRICS`` is a pure function of it (no metric runs the model).

Split kinds, decided by whether the rows have ``paraphrased_answer``:

* ``qa`` (TOFU forget / retain / holdout): ``prob`` = exp(−avgNLL(answer)); ``truth_ratio`` with
  correct = paraphrased answer, wrong = perturbed answers.
* ``options`` (TOFU real_authors / world_facts): ``prob`` = P(answer) normalised over the answer
  and its perturbed versions; ``truth_ratio`` with correct = answer.

``rouge`` is ROUGE-L recall of the greedy answer against ``answer`` on both kinds. Truth ratio
aggregates with mean(min(tr, 1/tr)) on the split named ``forget`` and mean(max(0, 1 − tr))
elsewhere (ALGORITHMS.md §5; TOFU, Maini et al. 2024, arXiv:2401.06121).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unlearnflow.metrics import tofu
from unlearnflow.metrics.scoring import eval_mode, generate_greedy, score_qa
from unlearnflow.registry import Registry

log = logging.getLogger(__name__)

QA, OPTIONS = "qa", "options"
FORGET_SPLIT = "forget"
CARRIED_FIELDS = ("author", "attribute")  # copied from a split row into its per-sample output row
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")


@dataclass(frozen=True)
class ScoredSplit:
    """Everything the metrics read about one split of one model.

    Attributes:
        name: split name (``forget``, ``retain``, ``world_facts``, …).
        kind: ``qa`` or ``options``.
        rows: the (possibly subsampled) split rows.
        indices: (N,) each row's index in the full split.
        nll_answer: (N,) avgNLL of ``answer``, or None when no metric needs it.
        nll_paraphrase: (N,) avgNLL of ``paraphrased_answer`` (``qa`` kind), or None.
        nll_perturbed: (N, K) avgNLL of the K ``perturbed_answer`` entries, or None.
        generations: N greedy answers, or None when ``rouge`` is not requested.
    """

    name: str
    kind: str
    rows: Sequence[Mapping[str, Any]]
    indices: np.ndarray
    nll_answer: np.ndarray | None = None
    nll_paraphrase: np.ndarray | None = None
    nll_perturbed: np.ndarray | None = None
    generations: list[str] | None = None


@dataclass(frozen=True)
class MetricValues:
    """One metric on one split: per-sample values (N,) and the aggregate reported for the split."""

    per_sample: np.ndarray
    aggregate: float


@dataclass(frozen=True)
class Metric:
    """A registered metric: its function and, per split kind, the inputs it needs scored.

    Inputs are ``answer``, ``paraphrase``, ``perturbed`` (avgNLL) and ``generation``.
    """

    compute: Callable[[ScoredSplit], MetricValues]
    needs: Mapping[str, frozenset[str]]


METRICS: Registry[Metric] = Registry("metric")


def _register(name: str, *, qa: set[str], options: set[str]) -> Callable:
    def deco(fn: Callable[[ScoredSplit], MetricValues]) -> Callable[[ScoredSplit], MetricValues]:
        METRICS.register(name)(Metric(fn, {QA: frozenset(qa), OPTIONS: frozenset(options)}))
        return fn

    return deco


@_register("prob", qa={"answer"}, options={"answer", "perturbed"})
def prob_metric(s: ScoredSplit) -> MetricValues:
    """``qa``: exp(−avgNLL(answer)); ``options``: normalised over the options. Mean aggregate."""
    values = (
        tofu.prob(s.nll_answer)
        if s.kind == QA
        else tofu.normalized_option_prob(s.nll_answer, s.nll_perturbed)
    )
    return MetricValues(values, float(np.mean(values)))


@_register("rouge", qa={"generation"}, options={"generation"})
def rouge_metric(s: ScoredSplit) -> MetricValues:
    """ROUGE-L recall of the greedy answer against ``answer``. Mean aggregate."""
    values = np.asarray(tofu.rouge_l_recall(s.generations, [r["answer"] for r in s.rows]), dtype=np.float64)
    return MetricValues(values, float(np.mean(values)))


@_register("truth_ratio", qa={"paraphrase", "perturbed"}, options={"answer", "perturbed"})
def truth_ratio_metric(s: ScoredSplit) -> MetricValues:
    """Raw per-sample truth ratios; forget aggregate on ``forget``, utility aggregate elsewhere."""
    correct = s.nll_paraphrase if s.kind == QA else s.nll_answer
    tr = tofu.truth_ratio(correct, s.nll_perturbed)
    agg = tofu.truth_ratio_forget(tr) if s.name == FORGET_SPLIT else tofu.truth_ratio_utility(tr)
    return MetricValues(tr, agg)


@dataclass
class EvalResult:
    """The suite's output for one model.

    Attributes:
        aggregates: ``"<split>_<metric>"`` → value, e.g. ``forget_prob``, ``world_facts_rouge``.
        per_sample: split → one dict per evaluated row: ``index`` (row index in the full split),
            ``question``, ``answer``, ``generation`` (if ``rouge`` ran), one key per metric
            (``prob``, ``rouge``, ``truth_ratio``: the raw tr, not its aggregate transform), and
            the row's ``author`` / ``attribute`` when present.
        forget_truth_ratios: (N,) raw truth ratios on the ``forget`` split (input of the KS test),
            or None if that split or metric was not evaluated.
    """

    aggregates: dict[str, float]
    per_sample: dict[str, list[dict]]
    forget_truth_ratios: np.ndarray | None


def split_kind(rows: Sequence[Mapping[str, Any]]) -> str:
    """``qa`` if the rows carry ``paraphrased_answer`` (TOFU forget/retain/holdout), else ``options``."""
    return QA if "paraphrased_answer" in rows[0] else OPTIONS


def subsample(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``range(n)`` of size ``min(n, max_samples)``.

    A fresh ``np.random.default_rng(seed)`` per call, so a split's subset depends only on its
    size and the seed: every model evaluated with one seed sees the same rows.
    """
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def _perturbed(name: str, rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    lists = [list(r["perturbed_answer"]) for r in rows]
    widths = {len(p) for p in lists}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(
            f"split {name!r}: every row needs the same number (>= 1) of perturbed_answer; got {widths}"
        )
    return lists


def score_split(
    model: torch.nn.Module,
    tokenizer: Any,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    indices: np.ndarray,
    *,
    needs: frozenset[str],
    batch_size: int,
    max_new_tokens: int,
    max_length: int,
    device: torch.device | str,
) -> ScoredSplit:
    """Run the model once over a split: one ``score_qa`` call for every needed answer variant and,
    if ``generation`` is needed, one ``generate_greedy`` call.

    Args:
        needs: subset of {``answer``, ``paraphrase``, ``perturbed``, ``generation``}.

    Returns:
        The ``ScoredSplit`` (fields not needed are None).
    """
    kind = split_kind(rows)
    questions = [r["question"] for r in rows]
    n = len(rows)
    pairs: list[tuple[str, str]] = []
    if "answer" in needs:
        pairs += [(q, r["answer"]) for q, r in zip(questions, rows, strict=True)]
    if "paraphrase" in needs:
        pairs += [(q, r["paraphrased_answer"]) for q, r in zip(questions, rows, strict=True)]
    if "perturbed" in needs:
        perturbed = _perturbed(name, rows)
        pairs += [(q, a) for q, p in zip(questions, perturbed, strict=True) for a in p]
    nll = score_qa(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, device=device)
    fields: dict[str, Any] = {}
    offset = 0
    for key, field in (("answer", "nll_answer"), ("paraphrase", "nll_paraphrase")):
        if key in needs:
            fields[field] = nll[offset : offset + n]
            offset += n
    if "perturbed" in needs:
        fields["nll_perturbed"] = nll[offset:].reshape(n, -1)  # row-major: row i's K answers are adjacent
    if "generation" in needs:
        fields["generations"] = generate_greedy(
            model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device
        )
    return ScoredSplit(name=name, kind=kind, rows=rows, indices=indices, **fields)


def _per_sample_rows(s: ScoredSplit, values: Mapping[str, MetricValues]) -> list[dict]:
    out = []
    for i, row in enumerate(s.rows):
        rec: dict[str, Any] = {
            "index": int(s.indices[i]),
            "question": row["question"],
            "answer": row["answer"],
        }
        if s.generations is not None:
            rec["generation"] = s.generations[i]
        rec.update({m: float(v.per_sample[i]) for m, v in values.items()})
        rec.update({k: row[k] for k in CARRIED_FIELDS if k in row})
        out.append(rec)
    return out


def evaluate_splits(
    model: torch.nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[dict]],
    *,
    metrics: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    max_length: int,
    device: torch.device | str,
    max_samples: int | None = None,
    seed: int = 0,
) -> EvalResult:
    """Evaluate one model on every split with the requested metrics (ALGORITHMS.md §5).

    Args:
        model: a causal LM on ``device``; put in eval mode for the call, its mode restored after.
        tokenizer: its tokenizer.
        splits: split name → rows in TOFU format (see the module docstring).
        metrics: names in ``METRICS`` (``prob``, ``rouge``, ``truth_ratio``).
        batch_size: rows per forward / per ``generate`` call.
        max_new_tokens: generation cap for ``rouge``.
        max_length: token cap per scored (question, answer) pair.
        device: where inputs go.
        max_samples: evaluate a seeded subset of at most this many rows per split (None: all).
        seed: seed of that subset.

    Returns:
        ``EvalResult`` with ``"<split>_<metric>"`` aggregates, per-sample rows and the raw forget
        truth ratios.

    Raises:
        ConfigError: an unknown metric name (the message lists the known ones).
        ValueError: an empty split, or rows with differing numbers of perturbed answers.
    """
    specs = {m: METRICS.get(m) for m in dict.fromkeys(metrics)}
    aggregates: dict[str, float] = {}
    per_sample: dict[str, list[dict]] = {}
    forget_tr: np.ndarray | None = None
    with eval_mode(model):
        for name, all_rows in splits.items():
            if len(all_rows) == 0:
                raise ValueError(f"split {name!r} is empty")
            indices = subsample(len(all_rows), max_samples, seed)
            rows = [all_rows[i] for i in indices]
            kind = split_kind(rows)
            needs = frozenset().union(*(spec.needs[kind] for spec in specs.values()))
            log.info(
                "evaluating split %s (%s, %d of %d rows): %s",
                name,
                kind,
                len(rows),
                len(all_rows),
                list(specs),
            )
            scored = score_split(
                model,
                tokenizer,
                name,
                rows,
                indices,
                needs=needs,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                device=device,
            )
            values = {m: spec.compute(scored) for m, spec in specs.items()}
            aggregates.update({f"{name}_{m}": v.aggregate for m, v in values.items()})
            per_sample[name] = _per_sample_rows(scored, values)
            if name == FORGET_SPLIT and "truth_ratio" in values:
                forget_tr = values["truth_ratio"].per_sample
    return EvalResult(aggregates=aggregates, per_sample=per_sample, forget_truth_ratios=forget_tr)


def summary_metrics(
    aggregates: Mapping[str, float],
    forget_tr: np.ndarray | None,
    oracle_forget_tr: np.ndarray | None,
    utility_splits: Sequence[str],
) -> dict[str, float]:
    """TOFU's two headline numbers from one model's results.

    Args:
        aggregates: ``EvalResult.aggregates``.
        forget_tr: the model's raw per-sample forget truth ratios.
        oracle_forget_tr: the oracle (retain) model's, on the same forget rows.
        utility_splits: splits whose ``prob``, ``rouge`` and ``truth_ratio`` aggregates enter the
            utility (TOFU: ``["retain", "real_authors", "world_facts"]``); splits absent from
            ``aggregates`` are skipped.

    Returns:
        ``forget_quality``: KS p-value vs the oracle, NaN (undefined, not zero) without an oracle;
        ``model_utility``: harmonic mean of the available sub-metrics, NaN if there are none.
    """
    if forget_tr is None or oracle_forget_tr is None:
        fq = math.nan
    else:
        fq = tofu.forget_quality(forget_tr, oracle_forget_tr)
    parts: dict[str, float] = {}
    for split in utility_splits:
        keys = [f"{split}_{m}" for m in UTILITY_METRICS]
        present = [k for k in keys if k in aggregates]
        if not present:
            continue
        if len(present) < len(keys):
            log.warning("model_utility: %s lacks %s", split, sorted(set(keys) - set(present)))
        parts.update({k: aggregates[k] for k in present})
    if not parts:
        log.warning("model_utility: none of the utility splits %s were evaluated", list(utility_splits))
    mu = tofu.model_utility(parts) if parts else math.nan
    return {"forget_quality": fq, "model_utility": mu}
