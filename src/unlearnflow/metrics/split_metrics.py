"""The split metrics: ``METRICS``, each a pure function of a ``ScoredSplit``, and the MIA scores.

Every metric in ``METRICS`` reads the ``ScoredSplit`` (``scored_split``) of one split and no metric
runs the model again. The one exception is ``mia_grad_norm``, which needs a backward pass per
sample (the suite runs it).

Which metrics apply to a split follows from its kind and role (``data.benchmark``):

================  ==============================================================================
kind              metrics (role forget / utility; ``mia`` splits get only the MIA scores)
================  ==============================================================================
qa                prob, rouge (ROUGE-L recall), truth_ratio (when the rows have paraphrased and
                  perturbed answers); on forget also exact_memorization, extraction_strength
options           prob (normalised over the options), rouge, truth_ratio (correct = answer)
knowmem           knowmem (ROUGE-L F1 of the generated answer, MUSE)
completion        verbmem (ROUGE-L F1 of the generated continuation, MUSE); on forget also
                  exact_memorization, extraction_strength of the continuation (the reference's MUSE eval)
text              prob; on forget also exact_memorization, extraction_strength
mcq               mcq_accuracy
================  ==============================================================================

MIA scores (``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_pp``, ``mia_grad_norm``) are
computed on the benchmark's member / non-member splits and reported as ROC-AUC by ``suite``; the
oracle-relative numbers (``mia_reference``, ``privleak``, ``forget_quality``) and
``model_utility`` come from ``relative.relative_metrics``. Definitions: ALGORITHMS.md §5,
docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unlearnflow.data.tokenize import IGNORE_INDEX
from unlearnflow.errors import ConfigError
from unlearnflow.metrics import memorization, mia, tofu
from unlearnflow.metrics.scored_split import ScoredSplit, SuiteOptions
from unlearnflow.registry import Registry

ALL_ROLES = frozenset({"forget", "utility"})


@dataclass(frozen=True)
class MetricValues:
    """One metric on one split: per-sample values (N,) and the aggregate reported for the split."""

    per_sample: np.ndarray
    aggregate: float


@dataclass(frozen=True)
class Metric:
    """A registered split metric: its function, the inputs it needs per kind, the roles it runs on.

    Inputs: ``target`` (token stats of the main target), ``paraphrase``, ``perturbed``,
    ``options`` and ``generation``.
    """

    compute: Callable[[ScoredSplit], MetricValues]
    needs: Mapping[str, frozenset[str]]
    roles: frozenset[str] = ALL_ROLES

    def applies(self, kind: str, role: str, rows: Sequence[Mapping[str, Any]]) -> bool:
        if kind not in self.needs or role not in self.roles:
            return False
        if kind == "qa" and "paraphrase" in self.needs[kind]:
            return "paraphrased_answer" in rows[0] and "perturbed_answer" in rows[0]
        return True


METRICS: Registry[Metric] = Registry("metric")


def _register(name: str, roles: frozenset[str] = ALL_ROLES, **needs: set[str]) -> Callable:
    def deco(fn: Callable[[ScoredSplit], MetricValues]) -> Callable[[ScoredSplit], MetricValues]:
        METRICS.register(name)(Metric(fn, {k: frozenset(v) for k, v in needs.items()}, roles))
        return fn

    return deco


def _mean(values: np.ndarray) -> MetricValues:
    return MetricValues(values, float(np.nanmean(values)) if values.size else math.nan)


@_register("prob", qa={"target"}, options={"target", "perturbed"}, text={"target"})
def prob_metric(s: ScoredSplit) -> MetricValues:
    """``qa`` / ``text``: exp(−avgNLL); ``options``: normalised over the options. Mean aggregate."""
    if s.kind == "options":
        return _mean(tofu.normalized_option_prob(s.nll_answer, s.nll_perturbed, definitions=s.definitions))
    return _mean(tofu.prob(s.nll_answer))


@_register("rouge", qa={"generation"}, options={"generation"})
def rouge_metric(s: ScoredSplit) -> MetricValues:
    """TOFU's ROUGE-L recall of the greedy answer against ``answer``. Mean aggregate."""
    return _mean(np.asarray(tofu.rouge_l_recall(s.generations, [r["answer"] for r in s.rows])))


@_register("truth_ratio", qa={"paraphrase", "perturbed"}, options={"target", "perturbed"})
def truth_ratio_metric(s: ScoredSplit) -> MetricValues:
    """Raw per-sample truth ratios; mean(min(tr, 1/tr)) on forget, mean(max(0, 1 − tr)) elsewhere."""
    correct = s.nll_paraphrase if s.kind == "qa" else s.nll_answer
    tr = tofu.truth_ratio(correct, s.nll_perturbed, definitions=s.definitions)
    if s.role == "forget":
        agg = tofu.truth_ratio_forget(tr, definitions=s.definitions)
    else:
        agg = tofu.truth_ratio_utility(tr)
    return MetricValues(tr, agg)


@_register("exact_memorization", frozenset({"forget"}), qa={"target"}, text={"target"}, completion={"target"})
def exact_memorization_metric(s: ScoredSplit) -> MetricValues:
    """Fraction of target tokens predicted exactly (final EOS left out). Mean aggregate."""
    return _mean(np.array([memorization.exact_memorization(t.correct[t.content]) for t in s.target]))


# On completion (MUSE verbmem_forget) as the reference's MUSE eval runs it (configs/eval/muse_metrics/
# extraction_strength.yaml: MUSE_forget_verbmem, the continuation scored after its prefix).
@_register(
    "extraction_strength", frozenset({"forget"}), qa={"target"}, text={"target"}, completion={"target"}
)
def extraction_strength_metric(s: ScoredSplit) -> MetricValues:
    """1 − k/|y| for the shortest prefix k after which the target is reproduced. Mean aggregate."""
    return _mean(
        np.array(
            [
                memorization.extraction_strength(t.correct[t.content], definitions=s.definitions)
                for t in s.target
            ]
        )
    )


@_register("knowmem", knowmem={"generation"})
def knowmem_metric(s: ScoredSplit) -> MetricValues:
    """MUSE KnowMem: ROUGE-L F1 of the generated answer against ``answer``. Mean aggregate."""
    return _mean(np.asarray(tofu.rouge_l_f1(s.generations, [r["answer"] for r in s.rows])))


@_register("verbmem", completion={"generation"})
def verbmem_metric(s: ScoredSplit) -> MetricValues:
    """MUSE VerbMem: ROUGE-L F1 of the generated continuation against ``gt``. Mean aggregate."""
    return _mean(np.asarray(tofu.rouge_l_f1(s.generations, [r["gt"] for r in s.rows])))


@_register("mcq_accuracy", mcq={"options"})
def mcq_accuracy_metric(s: ScoredSplit) -> MetricValues:
    """WMDP / MMLU accuracy: the choice of highest log-likelihood is the answer (lm-eval ``acc``)."""
    picked = np.argmax(s.option_logprob, axis=1)
    return _mean((picked == np.array([r["answer"] for r in s.rows])).astype(np.float64))


# --- membership inference ----------------------------------------------------------------------

MIA_ATTACKS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp", "mia_grad_norm")
RELATIVE = ("mia_reference", "privleak")  # need the oracle's per-sample values


def known_metrics() -> list[str]:
    return [*METRICS, *MIA_ATTACKS, *RELATIVE]


def check_metric_names(names: Sequence[str]) -> None:
    """Unknown names are a ``ConfigError`` listing the known ones."""
    known = known_metrics()
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown metric {name!r}; known: {', '.join(known)}")


def mia_needs(requested: set[str]) -> set[str]:
    """The member / non-member inputs the requested MIA metrics need."""
    needs: set[str] = set()
    if requested & {"mia_loss", "mia_zlib", "mia_min_k", "mia_reference", "privleak"}:
        needs.add("target")
    if "mia_min_k_pp" in requested:
        needs |= {"target", "vocab"}
    if "mia_grad_norm" in requested:
        needs |= {"target", "grad"}
    return needs


def zlib_texts(s: ScoredSplit, tok: Any) -> list[str]:
    """The texts ``mia_zlib`` compresses, by ``s.definitions``.

    ``"reference"``: the scored target tokens (labels not ``IGNORE_INDEX``, so a target cut by
    ``max_length`` is compressed as cut) decoded without special tokens, as open-unlearning's
    ``extract_target_texts_from_processed_data`` (``tokenizer.decode(labels, skip_special_tokens=True)``):
    the EOS or end-of-turn token is dropped, the answer's leading space kept (" Paris." compresses to
    one byte more than "Paris."). ``"unlearnflow"``: the row's raw target text.
    """
    if s.definitions == "unlearnflow":
        return list(s.target_texts)
    return [
        tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
        for ex in s.target_examples
    ]


def mia_scores(s: ScoredSplit, requested: set[str], opts: SuiteOptions, tok: Any) -> dict[str, np.ndarray]:
    """Per-sample member-likeness scores of the requested attacks (``mia_grad_norm`` is added later)."""
    k = opts.min_k_fraction
    out: dict[str, np.ndarray] = {}
    nll = s.nll_answer
    if "mia_loss" in requested:
        out["mia_loss"] = mia.loss_score(nll)
    if "mia_zlib" in requested:
        out["mia_zlib"] = mia.zlib_score(nll, zlib_texts(s, tok))
    if requested & {"mia_min_k", "privleak"}:
        out["mia_min_k"] = np.array([mia.min_k_score(t.logprobs[t.content], k) for t in s.target])
    if "mia_min_k_pp" in requested:
        out["mia_min_k_pp"] = np.array(
            [
                mia.min_k_pp_score(t.logprobs[t.content], t.mu[t.content], t.var[t.content], k)
                for t in s.target
            ]
        )
    return out
