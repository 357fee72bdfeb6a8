"""unlearnflow: machine unlearning for LLMs as a reproducible DVC + MLflow pipeline."""

__version__ = "0.1.0"
