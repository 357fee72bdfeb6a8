"""Evaluation metrics: batched scoring (``scoring``), metric maths (``tofu``, ``memorization``,
``mia``) and the suite that ties them to a benchmark's splits (``suite``)."""

from unlearnflow.metrics.suite import (
    METRICS,
    EvalResult,
    SuiteOptions,
    evaluate_splits,
    known_metrics,
    relative_metrics,
)

__all__ = ["METRICS", "EvalResult", "SuiteOptions", "evaluate_splits", "known_metrics", "relative_metrics"]
