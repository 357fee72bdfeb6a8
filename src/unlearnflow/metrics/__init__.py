"""Evaluation metrics: batched scoring (``scoring``), metric maths (``tofu``, ``memorization``,
``mia``), one split run through the model (``scored_split``), the metrics read off it
(``split_metrics``), the suite that ties them to a benchmark's splits (``suite``), the
oracle-relative numbers (``relative``) and the per-fact leak check of the forget answers (``facts``)."""

from unlearnflow.metrics.relative import relative_metrics
from unlearnflow.metrics.scored_split import SuiteOptions
from unlearnflow.metrics.split_metrics import METRICS, known_metrics
from unlearnflow.metrics.suite import EvalResult, evaluate_splits

__all__ = ["METRICS", "EvalResult", "SuiteOptions", "evaluate_splits", "known_metrics", "relative_metrics"]
