"""The MLflow side of the stage runs, in a worker process beside the stage process.

Why a process: importing ``mlflow`` and opening its SQLite store (SQLAlchemy's ORM set-up, alembic)
costs more CPU than importing torch, all of it pure Python (bench/startup.py; docs/startup.md). Done
in the stage process, it sat between the stage's set-up and its first real work. A thread would not
help, since both halves hold the GIL; a second process runs on another core while the stage imports
torch and loads its model, and the stage process never imports ``mlflow`` at all.

Protocol: :class:`TrackingWorker` (stage side) sends ``(op, kwargs)`` pairs over a pipe
(``multiprocessing.connection``: pickled, in order); :func:`serve` (worker side) runs them one by one.
Most operations are sent without waiting (per-step metrics, params, tags); the worker answers
``("started", run_id, experiment_id)`` once per run, ``("error", text)`` once when an operation of
the run fails, and ``("done", error)`` to the operations the stage waits for (artifacts, whose
files may be a temporary directory, and the end of the run). When the pipe closes with a run still
open (the stage process was killed), the worker ends that run KILLED at once.

One worker per stage process, reused by its successive runs (the attack stage opens one per
attack); it mirrors the stage process's working directory, environment and ``argv`` at each run's
start, so that the project root, the tracking URI and MLflow's source tags are the stage's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("unlearnflow.tracking_worker")  # not __main__ in the worker

_QUIET_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store.sql_alchemy")
# The most entities MLflow's log_batch takes at once (mlflow.utils.validation).
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
# An error goes back to the stage as one line, at most this long (its traceback is logged here).
MAX_ERROR_CHARS = 2000


class TrackingError(RuntimeError):
    """An MLflow operation failed in the tracking worker (its traceback is in the worker's log)."""


class TrackingWorker:
    """The stage side: spawns the worker and talks to it. Use :func:`shared`, not the constructor."""

    def __init__(self) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unlearnflow.tracking_worker", str(to_worker_r), str(from_worker_w)],
            pass_fds=(to_worker_r, from_worker_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._send = Connection(to_worker_w, readable=False)
        self._recv = Connection(from_worker_r, writable=False)
        self._run: tuple[str, str] | None = None
        self._error: str | None = None  # the current run's first failure, until raised
        self._raised = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, **spec: Any) -> None:
        """Begin a run (see :func:`_start` for ``spec``); returns at once."""
        self._run, self._error, self._raised = None, None, False
        self.send("start", **spec)

    def send(self, op: str, **kwargs: Any) -> None:
        """Queue ``op`` without waiting; first raise a failure the worker reported for this run."""
        self._drain(block=False)
        self.check()
        try:
            self._send.send((op, kwargs))
        except OSError as exc:
            raise TrackingError(f"the MLflow tracking worker (pid {self.proc.pid}) is gone") from exc

    def call(self, op: str, **kwargs: Any) -> None:
        """Run ``op`` and wait for it; then raise its failure, or an earlier one of this run not yet raised.

        The operation is sent even when an earlier one failed: an ``end`` must always reach the worker.
        """
        try:
            self._send.send((op, kwargs))
        except OSError as exc:
            raise TrackingError(f"the MLflow tracking worker (pid {self.proc.pid}) is gone") from exc
        error = self._drain(block=True)
        if error is not None and (self._error is None or self._raised):
            self._error, self._raised = error, False
        self.check()

    def run_ids(self) -> tuple[str, str]:
        """``(run_id, experiment_id)`` of the current run, waiting for the worker to create it."""
        while self._run is None:
            self.check()
            if self._error is not None:  # start failed: there is no run to wait for
                raise TrackingError(self._error)
            self._drain(block=True, until_started=True)
        return self._run

    def check(self) -> None:
        """Raise the current run's first failure, once."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise TrackingError(self._error)

    def _drain(self, *, block: bool, until_started: bool = False) -> str | None:
        """Read the worker's messages; with ``block``, until a ``done`` (or ``started``) arrives.

        Returns the error of the ``done`` reply (None when it succeeded, or when not blocking).
        """
        while block or self._recv.poll():
            try:
                kind, *rest = self._recv.recv()
            except (EOFError, OSError) as exc:
                raise TrackingError(f"the MLflow tracking worker (pid {self.proc.pid}) exited") from exc
            if kind == "started":
                self._run = (rest[0], rest[1])
                if until_started:
                    return None
            elif kind == "error":
                self._error = self._error or rest[0]
                if until_started:
                    return None
            elif kind == "done":
                return rest[0]
        return None


_shared: TrackingWorker | None = None


def shared() -> TrackingWorker:
    """This process's worker, spawned on first use (and again if it died)."""
    global _shared
    if _shared is None or not _shared.alive():
        _shared = TrackingWorker()
    return _shared


# ---- worker side ---------------------------------------------------------------------------------


class _Run:
    """The worker's state for the run in progress."""

    def __init__(
        self, mlflow: Any, client: Any, run_id: str, experiment_id: str, parent_id: str | None, pid: int
    ) -> None:
        self.mlflow, self.client, self.parent_id, self.pid = mlflow, client, parent_id, pid
        self.run_id, self.experiment_id = run_id, experiment_id
        self.error: str | None = None  # the first operation of the run that failed


def _start(
    *,
    cwd: str,
    env: dict[str, str],
    argv: list[str],
    uri: str,
    experiment: str,
    run_name: str,
    dvc_stage: str,
    tags: dict[str, str],
    execution: Any,
    parent_tags: dict[str, str],
    pid: int,
) -> _Run:
    """Open the store, find the experiment and the pipeline's parent run, close the runs of dead
    processes, start the run (MLflow's active run here, so fluent calls land in it)."""
    from unlearnflow.pipeline_run import PARENT_RUN_TAG, pipeline_parent
    from unlearnflow.run_liveness import close_dead_runs
    from unlearnflow.tracking_store import get_or_create_experiment, open_client, retry_locked

    os.chdir(cwd)  # project_root() and MLflow's source tags read them: the stage's, not ours
    os.environ.clear()
    os.environ.update(env)
    sys.argv = argv
    import mlflow

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    client = open_client(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    parent_id = None
    if execution is not None:
        parent_id = pipeline_parent(client, exp_id, execution, parent_tags, uri)
        tags = {**tags, PARENT_RUN_TAG: parent_id}
    close_dead_runs(client, exp_id, dvc_stage, closer_pid=pid)
    active = retry_locked(
        mlflow.start_run, experiment_id=exp_id, run_name=run_name, tags=tags, what="start run"
    )
    log.info("MLflow run %s (%s) in experiment %r at %s", run_name, active.info.run_id, experiment, uri)
    return _Run(mlflow, client, active.info.run_id, exp_id, parent_id, pid)


def _batch(
    run: _Run,
    *,
    metrics: Sequence[tuple[str, float, int, int]] = (),
    params: Sequence[tuple[str, str]] = (),
    tags: Sequence[tuple[str, str]] = (),
) -> None:
    """``log_batch`` in MLflow-sized chunks: metrics ``(key, value, ms, step)``, params and tags
    ``(key, value)``."""
    from mlflow.entities import Metric, Param, RunTag

    from unlearnflow.tracking_store import retry_locked

    batches = (
        ("metrics", [Metric(*m) for m in metrics], METRICS_PER_BATCH),
        ("params", [Param(*p) for p in params], PARAMS_PER_BATCH),
        ("tags", [RunTag(*t) for t in tags], PARAMS_PER_BATCH),
    )
    for kind, items, size in batches:
        for i in range(0, len(items), size):
            retry_locked(run.client.log_batch, run.run_id, **{kind: items[i : i + size]})


def _input(run: _Run, *, path: str, name: str, context: str) -> None:
    """Log a split file as a run input: source = its absolute path, digest = sha256[:16]."""
    import json

    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    from unlearnflow.io import sha256_file
    from unlearnflow.tracking_store import retry_locked

    # A LocalArtifactDatasetSource; resolve_dataset_source(str) would warn that "local" is ambiguous.
    source = get_dataset_source_from_json(json.dumps({"uri": path}), source_type="local")
    dataset = MetaDataset(source, name=name, digest=sha256_file(Path(path))[:16])
    retry_locked(run.mlflow.log_input, dataset, context=context, what="log input")


def _artifacts(run: _Run, *, path: str, artifact_path: str | None) -> None:
    if Path(path).is_dir():
        run.client.log_artifacts(run.run_id, path, artifact_path=artifact_path)
    else:
        run.client.log_artifact(run.run_id, path, artifact_path=artifact_path)


def _end(run: _Run, *, status: str) -> None:
    """End the run and carry its end to the pipeline's parent run; a failure's parent update never raises."""
    from unlearnflow.pipeline_run import end_in_parent
    from unlearnflow.tracking_store import retry_locked

    if status == "FINISHED" and run.error is not None:
        # An operation failed after the stage last heard from us: the run did not succeed either.
        status = "FAILED"
        with contextlib.suppress(Exception):
            run.client.set_tag(run.run_id, "unlearnflow.error", f"TrackingError: {run.error}")
    retry_locked(run.mlflow.end_run, status, what="end run")
    if run.parent_id is not None:
        if status == "FINISHED":
            end_in_parent(run.client, run.parent_id, status)
        else:
            with contextlib.suppress(Exception):  # never mask the stage's own error
                end_in_parent(run.client, run.parent_id, status)


def _killed(run: _Run) -> None:
    """The stage process went away with its run open: close the run KILLED, saying why."""
    from unlearnflow.run_liveness import KILLED_TAG

    why = f"stage process {run.pid} ended without closing the run (killed?); closed by its tracking worker"
    with contextlib.suppress(Exception):
        run.client.set_tag(run.run_id, KILLED_TAG, why)
    with contextlib.suppress(Exception):
        _end(run, status="KILLED")
    log.warning("MLflow run %s marked KILLED: %s", run.run_id, why)


_OPS = {"batch": _batch, "input": _input, "artifacts": _artifacts}
_WAITED_FOR = ("artifacts", "end")


def serve(inbox: Connection, outbox: Connection) -> None:
    """Run the stage's operations until the stage closes the pipe (see the module docstring)."""
    run: _Run | None = None
    try:
        while True:
            op, kwargs = inbox.recv()
            error = None
            try:
                if op == "start":
                    run = None  # a run whose start fails takes no further operation
                    run = _start(**kwargs)
                    outbox.send(("started", run.run_id, run.experiment_id))
                elif run is None:
                    pass  # the start failed (and said so): nothing to log into
                elif op == "end":
                    _end(run, **kwargs)
                    run = None
                else:
                    _OPS[op](run, **kwargs)
            except Exception as exc:
                log.error("MLflow %s failed:\n%s", op, traceback.format_exc())
                error = f"{op}: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                if op == "end":
                    run = None
                elif run is None or run.error is None:  # the first failure of this run: tell the stage
                    if run is not None:
                        run.error = error
                    outbox.send(("error", error))
            if op in _WAITED_FOR:
                outbox.send(("done", error))
    except (EOFError, BrokenPipeError):
        # The stage closed the pipe: it exited, or was killed with its run open. (Leaving the run
        # to MLflow's own atexit hook would end it FINISHED.)
        if run is not None:
            _killed(run)


def main() -> None:
    # Ctrl-C reaches the whole process group: the stage handles it and ends the run KILLED itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    inbox = Connection(int(sys.argv[1]), writable=False)
    outbox = Connection(int(sys.argv[2]), readable=False)
    serve(inbox, outbox)


if __name__ == "__main__":
    main()
