"""Which process a stage run belongs to, and closing the runs whose process died.

Every stage run is tagged with the host, pid and process start time of its stage
(:func:`process_tags`). A stage killed with ``kill -9`` has its run closed KILLED by its tracking
worker (:mod:`unlearnflow.tracking_worker`); when both die (the OOM killer taking the process group,
a power loss) the run would stay RUNNING forever, and the next run of the same stage item closes it
as KILLED (:func:`close_dead_runs`, called by the tracking worker when it starts that run).

``mlflow`` is never imported here (the client is passed in) and ``psutil`` only when called, so that
importing this module is free.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from unlearnflow.tracking_store import retry_locked

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Tags that identify the process behind a run (see close_dead_runs).
HOST_TAG, PID_TAG, PID_START_TAG = "unlearnflow.host", "unlearnflow.pid", "unlearnflow.pid_start"
KILLED_TAG = "unlearnflow.killed"
# Two create_time() readings of one process agree to the clock tick (10 ms); a reused pid belongs
# to a process started later, so a start time off by more than this is another process.
PID_START_TOLERANCE_S = 1.0


def process_tags() -> dict[str, str]:
    """Host, pid and start time of this process: what :func:`close_dead_runs` checks."""
    import psutil  # a dependency of dvc and accelerate

    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_START_TAG: f"{psutil.Process().create_time():.3f}",
    }


def process_alive(pid: int, start: float | None) -> bool:
    """Whether process ``pid`` on this host still runs and is the one that started at ``start``.

    A zombie (killed, not yet reaped) counts as gone; a pid whose start time differs from ``start``
    by more than ``PID_START_TOLERANCE_S`` was reused by another process, so the original is gone.
    A process we may not inspect exists, so it counts as alive.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if start is not None and abs(proc.create_time() - start) > PID_START_TOLERANCE_S:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def close_dead_runs(
    client: MlflowClient, experiment_id: str, dvc_stage: str, *, closer_pid: int | None = None
) -> list[str]:
    """Set KILLED every RUNNING run of ``dvc_stage`` in the experiment whose process is gone.

    A stage killed with ``kill -9`` (or by the OOM killer) never reaches ``end_run``, so its run
    would stay RUNNING forever. A run is closed only when it was started on this host and its
    process (pid and start time, :func:`process_tags`) no longer exists: a run of a live process,
    such as the same item in another ``dvc queue`` worker, is never touched, and neither is a run
    from another host or one without these tags (started before they existed), whose process
    cannot be checked from here.

    Args:
        client: the MLflow client.
        experiment_id: the experiment to search.
        dvc_stage: the ``dvc.stage`` tag (``unlearn@grad_ascent-adamw``).
        closer_pid: the stage process closing them, named in the reason (default: this process;
            the tracking worker passes its stage's).

    Returns:
        The ids of the runs closed; each gets a ``unlearnflow.killed`` tag saying why.
    """
    host = socket.gethostname()
    runs = retry_locked(
        client.search_runs,
        [experiment_id],
        filter_string="attributes.status = 'RUNNING'",
        max_results=1000,
        what="search RUNNING runs",
    )
    closed = []
    for run in runs:
        tags = run.data.tags
        if tags.get("dvc.stage") != dvc_stage or tags.get(HOST_TAG) != host or not tags.get(PID_TAG):
            continue
        start = float(tags[PID_START_TAG]) if tags.get(PID_START_TAG) else None
        if process_alive(int(tags[PID_TAG]), start):
            continue
        why = (
            f"process {tags[PID_TAG]} on {host} ended without closing the run (killed?); "
            f"closed by the next run of {dvc_stage} (pid {closer_pid or os.getpid()})"
        )
        retry_locked(client.set_tag, run.info.run_id, KILLED_TAG, why)
        retry_locked(client.set_terminated, run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) marked KILLED: %s", run.info.run_name, run.info.run_id, why)
        closed.append(run.info.run_id)
    return closed
