"""The parent MLflow run of one DVC pipeline execution, under which its stage runs nest.

A ``dvc repro``, a ``dvc exp run`` or one queued experiment runs every stage as its own process, so
no process sees the whole execution: each stage finds its execution's key from its ancestry
(:func:`pipeline_execution`), and the first stage to ask creates the parent run
(:func:`pipeline_parent`); :mod:`unlearnflow.tracking` nests each stage run under it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearnflow.tracking_store import retry_locked

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# The parent run of a pipeline execution carries the execution's key in PIPELINE_TAG and
# "pipeline" as its unlearnflow.stage; each stage run names it in MLflow's own nesting tag
# (mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID), which the UI reads.
PIPELINE_TAG = "unlearnflow.pipeline"
PIPELINE_STAGE = "pipeline"
PARENT_RUN_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class PipelineExecution:
    """One DVC pipeline execution, as a stage it started sees it.

    Attributes:
        key: ``<host>:<pid>:<start time>`` of the DVC process that runs the stages: the same for
            every stage of one execution, another for the next (a reused pid has a later start).
        name: the DVC experiment's name (``DVC_EXP_NAME``), else ``repro-<start, local time>``.
        start_ms: the DVC process's start (ms since the epoch), which becomes the parent run's.
    """

    key: str
    name: str
    start_ms: int


def _is_dvc_command(cmdline: Sequence[str]) -> bool:
    """``dvc …`` as its console script (run directly, or as an interpreter's script) or ``python -m dvc``."""
    return "dvc" in [Path(arg).name for arg in cmdline[:2]] or list(cmdline[1:3]) == ["-m", "dvc"]


def pipeline_execution(
    env: Mapping[str, str] | None = None, ancestors: Sequence[Any] | None = None
) -> PipelineExecution | None:
    """The DVC pipeline execution this stage process belongs to, or None outside DVC.

    DVC sets ``DVC_STAGE`` for every stage command but no id of the execution (dvc 3.67
    ``stage/run.py::prepare_kwargs``), and ``DVC_EXP_NAME`` only under ``dvc exp run``, where a
    rerun under the same name is another execution. Every stage is a child (through a shell) of the
    DVC process executing the pipeline: ``dvc repro``, ``dvc exp run`` in the workspace, or the
    ``dvc exp exec-run`` of one queued experiment (``repo/experiments/queue/tasks.py``). The nearest
    ancestor that is ``dvc`` is that process; its pid and start time name the execution.

    Args:
        env: the environment (default ``os.environ``).
        ancestors: processes, nearest first, with ``pid``, ``cmdline()`` and ``create_time()``
            (default: this process's parents, from psutil).

    Returns:
        None when ``DVC_STAGE`` is unset (a stage run by hand, a test) or no ancestor is ``dvc``.
    """
    import psutil  # a dependency of dvc and accelerate

    env = os.environ if env is None else env
    if not env.get("DVC_STAGE"):
        return None
    for proc in psutil.Process().parents() if ancestors is None else ancestors:
        try:
            if not _is_dvc_command(proc.cmdline()):
                continue
            start = proc.create_time()
        except psutil.Error:  # exited meanwhile, or not ours to inspect
            continue
        name = env.get("DVC_EXP_NAME") or time.strftime("repro-%Y%m%d-%H%M%S", time.localtime(start))
        return PipelineExecution(f"{socket.gethostname()}:{proc.pid}:{start:.3f}", name, int(start * 1000))
    return None


def pipeline_parent(
    client: MlflowClient, experiment_id: str, execution: PipelineExecution, tags: Mapping[str, str], uri: str
) -> str:
    """The id of ``execution``'s parent run in the experiment; the first stage run creates it.

    MLflow cannot end a run "when its last child ends", and a RUNNING parent would outlive a
    ``kill -9``; so the parent is never RUNNING. It is created FINISHED, starting when the DVC
    process started, and every stage run that ends moves the parent's end time to its own end and
    makes it FAILED (or KILLED) once any stage failed (:func:`end_in_parent`). Stages of one execution run
    one after another; the find-or-create is still serialised by a lock per store, as
    :func:`.tracking_store.open_client` serialises the store's creation.
    """
    import tempfile

    from filelock import FileLock  # a dependency of torch

    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"unlearnflow-pipeline-{key}.lock", timeout=300):
        found = retry_locked(
            client.search_runs,
            [experiment_id],
            filter_string=f"tags.`{PIPELINE_TAG}` = '{execution.key}'",
            max_results=1,
            what="find the pipeline run",
        )
        if found:
            return found[0].info.run_id
        parent = retry_locked(
            client.create_run,
            experiment_id,
            start_time=execution.start_ms,
            tags={**tags, PIPELINE_TAG: execution.key, "unlearnflow.stage": PIPELINE_STAGE},
            run_name=execution.name,
            what="create the pipeline run",
        )
        retry_locked(client.set_terminated, parent.info.run_id, "FINISHED", what="end the pipeline run")
        log.info("MLflow pipeline run %s (%s)", execution.name, parent.info.run_id)
        return parent.info.run_id


def end_in_parent(client: MlflowClient, parent_id: str, status: str) -> None:
    """Carry a stage run's end to its parent: end time now; FAILED or KILLED sticks, FINISHED does not undo it."""
    parent = retry_locked(client.get_run, parent_id, what="read the pipeline run")
    if parent.info.status in ("FAILED", "KILLED"):
        status = parent.info.status
    retry_locked(client.set_terminated, parent_id, status, what="end the pipeline run")
