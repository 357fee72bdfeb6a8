"""Evaluation metrics: batched scoring (``scoring``), metric maths (``tofu``, ``memorization``,
``mia``), one split run through the model (``scored_split``), the metrics read off it
(``split_metrics``), the suite that ties them to a benchmark's splits (``suite``) and the
oracle-relative numbers (``relative``)."""

from unlearnflow.metrics.relative import relative_metrics
from unlearnflow.metrics.scored_split import SuiteOptions
from unlearnflow.metrics.split_metrics import METRICS, known_metrics
from unlearnflow.metrics.suite import EvalResult, evaluate_splits

__all__ = ["METRICS", "EvalResult", "SuiteOptions", "evaluate_splits", "known_metrics", "relative_metrics"]
