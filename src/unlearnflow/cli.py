"""What every stage script shares: a Typer app, one-line user errors, logging, the experiment name."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from unlearnflow.config import BenchmarkConfig, TrackingConfig, load_section
from unlearnflow.errors import UnlearnflowError

EXIT_USER_ERROR = 2


def stage_app(help: str) -> typer.Typer:
    """A Typer app whose user errors print one line (no Rich traceback)."""
    for var, value in (
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("DVC_NO_ANALYTICS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(var, value)
    return typer.Typer(help=help, add_completion=False, pretty_exceptions_enable=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn an ``UnlearnflowError`` into ``error: <message>`` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        yield
    except UnlearnflowError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def experiment_name(params: Path) -> str:
    """One MLflow experiment per benchmark: ``tracking.experiment`` or ``unlearnflow-<benchmark.name>``."""
    tracking = load_section(params, "tracking", TrackingConfig)
    if tracking.experiment:
        return tracking.experiment
    return f"unlearnflow-{load_section(params, 'benchmark', BenchmarkConfig).name}"


def item_name(method: str, optimizer: str, seed: int, attack: str | None = None) -> str:
    """The item (directory, MLflow run) name of one unlearned model, or of one attack on it.

    ``<method>-<optimizer>-s<seed>`` and ``<method>-<optimizer>-s<seed>-<attack>``: the ``s`` keeps
    the seed readable among names. (DVC names the same matrix items ``…-<seed>-…``, from the values.)
    """
    name = f"{method}-{optimizer}-s{seed}"
    return f"{name}-{attack}" if attack is not None else name
