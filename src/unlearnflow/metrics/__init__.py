"""Evaluation metrics: batched scoring (``scoring``), TOFU maths (``tofu``), the suite (``suite``)."""

from unlearnflow.metrics.suite import METRICS, EvalResult, evaluate_splits, summary_metrics

__all__ = ["METRICS", "EvalResult", "evaluate_splits", "summary_metrics"]
