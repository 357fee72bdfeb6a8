"""MLflow glue for the stages: one run per stage item, tagged, with a ``run.json`` manifest.

Conventions (ARCHITECTURE.md, "Tracking conventions"):

* Where the runs go, and how concurrent stages write there, is :mod:`unlearnflow.tracking_store`:
  ``sqlite:///<project root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set (the project root
  even for a queued DVC experiment), locked writes retried, store creation serialised. Runs under
  ``dvc exp`` are tagged with the experiment's name and baseline revision.
* Every run is tagged with the host, pid and process start time of the stage; a RUNNING run of the
  same stage item whose process is gone is closed as KILLED by the next run of that item
  (:mod:`unlearnflow.run_liveness`).
* One experiment per benchmark, one run per stage item named ``<stage>-<item>`` (``<stage>`` alone
  when there is no item), tagged with the git commit, the dirty flag, the DVC stage name
  (``<stage>@<item>``), a hash of the params and the run ids of the upstream stages.
* Each stage writes a ``run.json`` manifest; the next stage passes it back as ``upstream``.
* Every stage run of one pipeline execution (a ``dvc repro``, a ``dvc exp run``, one queued
  experiment) is nested (``mlflow.parentRunId``) under one parent run named by the DVC experiment,
  else ``repro-<time>`` (:func:`.pipeline_run.pipeline_execution`); a stage run outside DVC has no parent.

Every MLflow call runs in a worker process beside the stage (:mod:`unlearnflow.tracking_worker`):
importing ``mlflow`` and opening the store cost more than importing torch, and there they overlap
with the stage's own start instead of delaying its work. This module never imports ``mlflow``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearnflow import tracking_worker
from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import read_json, sha256_dir, write_json
from unlearnflow.pipeline_run import pipeline_execution
from unlearnflow.run_liveness import process_tags
from unlearnflow.tracking_store import tracking_uri

if TYPE_CHECKING:
    from unlearnflow.tracking_worker import TrackingWorker

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): values longer than these are rejected or truncated.
MAX_PARAM_VALUE_LEN = 6000
MAX_TAG_VALUE_LEN = 8000
# Buffered per-step metrics are written when this many are pending or this many seconds have passed.
FLUSH_EVERY_METRICS = 1000
FLUSH_EVERY_SECONDS = 10.0
# The training health flags of a run (train.health_flags), "; "-joined, or "ok".
HEALTH_TAG = "unlearnflow.health"


def dvc_experiment_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``dvc.exp_name`` and ``dvc.exp_baseline_rev`` of the DVC experiment this stage runs in.

    ``dvc exp run`` (queued, ``--temp`` or in the workspace) passes ``DVC_EXP_NAME`` and
    ``DVC_EXP_BASELINE_REV`` to every stage command (dvc 3.67
    ``repo/experiments/queue/base.py``); a plain ``dvc repro`` sets neither, and gets no tags.
    """
    env = os.environ if env is None else env
    tags = {}
    if env.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = env["DVC_EXP_NAME"]
    if env.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = env["DVC_EXP_BASELINE_REV"]
    return tags


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys; lists and tuples become their JSON string.

    ``{"unlearn": {"lr": 1e-5, "ids": [1, 2], "args": {}}}`` →
    ``{"unlearn.lr": 1e-5, "unlearn.ids": "[1, 2]", "unlearn.args": "{}"}``. Other leaves are kept
    as they are; an empty mapping is kept as ``"{}"`` so that its key still shows up.

    Args:
        d: a (possibly nested) mapping with string keys.
        prefix: prepended to every key, followed by a dot.

    Returns:
        A flat dict.
    """
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, name))
            else:
                out[name] = "{}"
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = value
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON of ``params`` (sorted keys, compact)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict:
    """Read a ``run.json`` manifest written by :meth:`StageRun.write_manifest`."""
    return read_json(path)


def git_state(cwd: Path | None = None) -> tuple[str, str]:
    """``(commit, dirty)`` of the git work tree at ``cwd``: HEAD's sha and ``"true"``/``"false"``.

    Both are ``"none"`` outside a git repository (or one without commits, or without git).
    Untracked files count as dirty (``git status --porcelain``).
    """
    cwd = Path(cwd or Path.cwd())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--verify", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "none", "none"
    return head, "true" if status.strip() else "false"


def _truncate(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _upstream_tags(upstream: Sequence[Path], uri: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for path in upstream:
        path = Path(path)
        if not path.is_file():
            log.info("no upstream manifest at %s: upstream tag skipped", path)
            continue
        manifest = read_manifest(path)
        try:
            tags[f"upstream.{manifest['run_name']}"] = manifest["run_id"]
        except (KeyError, TypeError) as e:
            raise UnlearnflowError(f"{path} is not a run.json manifest (no run_name/run_id)") from e
        if manifest.get("tracking_uri") not in (None, uri):
            log.warning(
                "upstream run %s was tracked at %s, not %s", manifest["run_id"], manifest["tracking_uri"], uri
            )
    return tags


class StageRun:
    """The MLflow run of one stage item; created by :func:`stage_run`, not directly.

    Every call hands its work to the tracking worker and returns (artifacts excepted: their files
    may be gone once the call returns, so it waits); a failure there is raised by the next call.
    Per-step metrics are buffered and sent in batches (every ``FLUSH_EVERY_METRICS`` values or
    ``FLUSH_EVERY_SECONDS``, and when the run ends), so :meth:`log_metrics` is cheap to call every step.
    """

    def __init__(
        self,
        worker: TrackingWorker,
        *,
        experiment: str,
        uri: str,
        stage: str,
        item: str | None,
        run_name: str,
        params_hash: str,
    ) -> None:
        self._worker = worker
        self.experiment = experiment
        self.tracking_uri = uri
        self.stage = stage
        self.item = item
        self.run_name = run_name
        self.params_hash = params_hash
        self._params: dict[str, str] = {}
        self._pending: list[tuple[str, float, int, int]] = []
        self._last_flush = time.monotonic()
        self._ids: tuple[str, str] | None = None  # (run id, experiment id), once the worker has them

    @property
    def run_id(self) -> str:
        """The MLflow run id (waits for the worker to have created the run)."""
        return self._resolve()[0]

    @property
    def experiment_id(self) -> str:
        return self._resolve()[1]

    def _resolve(self) -> tuple[str, str]:
        if self._ids is None:
            self._ids = self._worker.run_ids()
        return self._ids

    def _pin(self) -> None:
        """Keep the ids once the run has ended: the worker's next run must not answer for this one."""
        with contextlib.suppress(tracking_worker.TrackingError):  # a run that never started has none
            self._resolve()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step`` (per-step) or without one (final, stored at step 0).

        ``None`` values are skipped; NaN and inf are kept. Values go through ``float()``, so 0-d
        tensors and numpy scalars are fine. Writes are buffered (see the class docstring).
        """
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._pending.append((key, float(value), now, int(step or 0)))
        if (
            len(self._pending) >= FLUSH_EVERY_METRICS
            or time.monotonic() - self._last_flush >= FLUSH_EVERY_SECONDS
        ):
            self.flush()
        else:
            self._worker.check()  # a failed write of an earlier batch stops the stage here

    def flush(self) -> None:
        """Send the buffered metrics now."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if pending:
            self._worker.send("batch", metrics=pending)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params flattened to dotted keys (values as strings, truncated to MLflow's limit).

        Re-logging a key with the same value is a no-op; with a different value it raises
        ``ValueError`` (MLflow params are immutable).
        """
        new: dict[str, str] = {}
        for key, value in flatten(params).items():
            text = _truncate(value, MAX_PARAM_VALUE_LEN)
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                raise ValueError(f"param {key!r} already logged as {old!r}, cannot change it to {text!r}")
        if new:
            self._worker.send("batch", params=list(new.items()))
        self._params.update(new)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values as strings, truncated to MLflow's limit)."""
        items = [(k, _truncate(v, MAX_TAG_VALUE_LEN)) for k, v in tags.items()]
        if items:
            self._worker.send("batch", tags=items)

    def log_health(self, flags: Sequence[str]) -> None:
        """Tag the run's training health: ``unlearnflow.health`` = the flags joined by "; ", or "ok"."""
        self.set_tags({HEALTH_TAG: "; ".join(flags) or "ok"})

    def log_dataset(self, path: Path, name: str, context: str) -> None:
        """Log a split file as a run input: source = its absolute path, digest = sha256[:16].

        Only metadata is logged (``MetaDataset``), never the data itself; the worker hashes the file.

        Args:
            path: the split file (e.g. ``data/splits/forget10.jsonl``).
            name: dataset name shown in MLflow (e.g. ``forget10``).
            context: how the stage uses it (e.g. ``forget``, ``retain``, ``eval``).
        """
        self._worker.send("input", path=str(Path(path).resolve()), name=name, context=context)

    def log_checkpoint(self, path: Path, max_mb: float) -> None:
        """Tag the checkpoint at ``path`` and log it as artifacts under ``checkpoint/`` if small enough.

        Tags ``checkpoint.path`` (as given), ``checkpoint.sha256`` (:func:`io.sha256_dir`),
        ``checkpoint.mb`` and ``checkpoint.logged`` are always set; the files are copied to the
        artifact store only when their total size is at most ``max_mb`` megabytes (2**20 bytes).
        Call it on the final path, after any ``atomic_dir`` has been renamed into place.
        """
        path = Path(path)
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        logged = size_mb <= max_mb
        self.set_tags(
            {
                "checkpoint.path": str(path),
                "checkpoint.sha256": sha256_dir(path),
                "checkpoint.mb": f"{size_mb:.3f}",
                "checkpoint.logged": str(logged).lower(),
            }
        )
        if logged:
            self.log_artifact(path, "checkpoint")
        else:
            log.info("checkpoint %s is %.1f MB > %.1f MB: tagged, not logged", path, size_mb, max_mb)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file (or every file of a directory) as artifacts, under ``artifact_path`` if given.

        Waits until the worker has copied them: the caller may move or delete ``path`` right after.
        """
        self._worker.call("artifacts", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def manifest(self) -> dict[str, Any]:
        """The ``run.json`` content: how the next stage finds this run."""
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "experiment": self.experiment,
            "tracking_uri": self.tracking_uri,
            "stage": self.stage,
            "item": self.item,
            "run_name": self.run_name,
            "params_hash": self.params_hash,
        }

    def write_manifest(self, path: Path) -> None:
        """Write :meth:`manifest` to ``path`` as JSON, atomically."""
        write_json(path, self.manifest())


@contextlib.contextmanager
def stage_run(
    stage: str,
    item: str | None,
    *,
    experiment: str,
    params: Mapping[str, Any],
    upstream: Sequence[Path] = (),
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage item; it ends FINISHED, or FAILED if the block raises.

    The block starts at once: the tracking worker opens the store and creates the run meanwhile
    (:mod:`.tracking_worker`). A failure there (an unreachable store, a database still locked after
    the retries) is raised by the next call on the run, at the latest when the run ends; a run
    whose later write failed ends FAILED. Under DVC it is nested under the parent run of the
    pipeline execution (:func:`.pipeline_run.pipeline_execution`), whose end time and status follow it.

    Args:
        stage: DVC stage name (``unlearn``).
        item: matrix item (``grad_ascent-adamw``) or ``None`` for a stage without a matrix.
        experiment: MLflow experiment name (one per benchmark); created if missing.
        params: the stage's params; logged flattened, and hashed into the ``params.hash`` tag.
        upstream: ``run.json`` manifests of the upstream stages; missing files are skipped.

    Yields:
        The :class:`StageRun`.

    Raises:
        UnlearnflowError: an upstream file exists but is not a manifest (before any run is created).
        Whatever the block raises, after marking the run FAILED (KILLED on Ctrl-C).
    """
    uri = tracking_uri()
    run_name = f"{stage}-{item}" if item else stage
    # DVC names the running stage itself (matrix items by their values: unlearn@grad_diff-adamw-0,
    # evaluate_base@target); outside DVC the name is rebuilt from the stage and item.
    dvc_stage = os.environ.get("DVC_STAGE") or (f"{stage}@{item}" if item else stage)
    commit, dirty = git_state()
    phash = params_hash(params)
    common = {"git.commit": commit, "git.dirty": dirty, **dvc_experiment_tags()}
    tags = {
        **common,
        "dvc.stage": dvc_stage,
        "params.hash": phash,
        "unlearnflow.stage": stage,
        "unlearnflow.item": item or "",
        **process_tags(),
        **_upstream_tags(upstream, uri),  # a malformed manifest raises here, before any run exists
    }
    worker = tracking_worker.shared()
    worker.start(
        cwd=os.getcwd(),
        env=dict(os.environ),
        argv=list(sys.argv),
        uri=uri,
        experiment=experiment,
        run_name=run_name,
        dvc_stage=dvc_stage,
        tags=tags,
        execution=pipeline_execution(),
        parent_tags={**common, "unlearnflow.item": ""},
        pid=os.getpid(),
    )
    run = StageRun(
        worker,
        experiment=experiment,
        uri=uri,
        stage=stage,
        item=item,
        run_name=run_name,
        params_hash=phash,
    )
    try:
        run.log_params(params)
        yield run
        run.flush()
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # never mask the original error
            run.flush()
        with contextlib.suppress(Exception):
            run.set_tags({"unlearnflow.error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(Exception):
            worker.call("end", status=status)
        run._pin()
        raise
    try:
        worker.call("end", status="FINISHED")
    finally:
        run._pin()
