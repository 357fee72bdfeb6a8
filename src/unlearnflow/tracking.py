"""MLflow glue for the stages: one run per stage item, tagged, with a ``run.json`` manifest.

Conventions (ARCHITECTURE.md, "Tracking conventions"):

* Backend ``sqlite:///<root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set; artifacts of the
  experiments created here go under ``<root>/mlruns/``. ``<root>`` is the project root
  (:func:`project_root`), never the temporary workspace of a queued DVC experiment, so that every
  run of every experiment lands in the one store. Runs under ``dvc exp`` are tagged with the
  experiment's name and baseline revision.
* Every run is tagged with the host, pid and process start time of the stage; a RUNNING run of the
  same stage item whose process is gone (``kill -9``, OOM killer, power loss) is closed as KILLED
  by the next run of that item (:func:`close_dead_runs`).
* SQLite with several writers (``dvc queue start -j 2``): MLflow sets ``PRAGMA busy_timeout =
  20000`` on every session (``mlflow.store.db.utils._get_managed_session_maker``); writes made
  here are retried on top of that when the database is still locked (:func:`retry_locked`).
* One experiment per benchmark, one run per stage item named ``<stage>-<item>`` (``<stage>`` alone
  when there is no item), tagged with the git commit, the dirty flag, the DVC stage name
  (``<stage>@<item>``), a hash of the params and the run ids of the upstream stages.
* Each stage writes a ``run.json`` manifest; the next stage passes it back as ``upstream``.

``mlflow`` is imported lazily (it costs about two seconds) so that importing this module is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import read_json, sha256_dir, sha256_file, write_json

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): values longer than these are rejected or truncated.
MAX_PARAM_VALUE_LEN = 6000
MAX_TAG_VALUE_LEN = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
# Buffered per-step metrics are written when this many are pending or this many seconds have passed.
FLUSH_EVERY_METRICS = 1000
FLUSH_EVERY_SECONDS = 10.0

_QUIET_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store.sql_alchemy")
_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


# DVC runs a queued (``dvc exp run --queue``) or ``--temp`` experiment in a clone of the repo at
# ``<root>/.dvc/tmp/exps/<tmpXXXX>`` (``…/exps/standalone/<tmpXXXX>`` for ``--temp``), deleted when
# the experiment ends: dvc 3.67 ``repo/experiments/executor/local.py`` (``mkdtemp`` under
# ``repo.tmp_dir / EXEC_TMP_DIR``), ``repo/__init__.py`` (``tmp_dir = <.dvc>/tmp``) and
# ``repo/experiments/utils.py`` (``EXEC_TMP_DIR = "exps"``).
EXEC_TMP_PARTS = (".dvc", "tmp", "exps")
# Extra attempts for a call that still finds the SQLite database locked after MLflow's own 20 s busy
# timeout, with exponential backoff from RETRY_FIRST_SLEEP_S: 1 + 2 + … + 32 = 63 s of sleep on top
# of the busy waits, long enough for another worker's schema migration or a slow checkpoint commit.
RETRY_ATTEMPTS = 6
RETRY_FIRST_SLEEP_S = 1.0
_LOCKED_MESSAGES = ("database is locked", "database table is locked")
# Tags that identify the process behind a run (see close_dead_runs).
HOST_TAG, PID_TAG, PID_START_TAG = "unlearnflow.host", "unlearnflow.pid", "unlearnflow.pid_start"
KILLED_TAG = "unlearnflow.killed"
# The training health flags of a run (train.health_flags), "; "-joined, or "ok".
HEALTH_TAG = "unlearnflow.health"
# Two create_time() readings of one process agree to the clock tick (10 ms); a reused pid belongs
# to a process started later, so a start time off by more than this is another process.
PID_START_TOLERANCE_S = 1.0

_T = TypeVar("_T")


def _strip_exec_tmp(path: Path) -> Path:
    """``<root>/.dvc/tmp/exps/…`` → ``<root>``; any other path unchanged."""
    parts = path.parts
    n = len(EXEC_TMP_PARTS)
    for i in range(len(parts) - n + 1):
        if parts[i : i + n] == EXEC_TMP_PARTS:
            return Path(*parts[:i])
    return path


def project_root(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The project root whose ``mlflow.db`` and ``mlruns/`` every stage run tracks into.

    DVC sets ``DVC_ROOT`` for every stage command (dvc 3.67 ``stage/run.py::prepare_kwargs``: the
    repo root), and for a queued experiment overrides it with the *parent* repo's root rather than
    the executor's temporary clone (``repo/experiments/queue/base.py``: "Override DVC_ROOT env var
    to point to the parent DVC repo root (and not an executor tempdir root)"). So:

    1. ``DVC_ROOT``, when ``cwd`` lies inside it (a ``DVC_ROOT`` left over from some other repo in
       the environment is ignored), with any ``.dvc/tmp/exps/…`` tail removed;
    2. otherwise ``cwd``, with any ``.dvc/tmp/exps/…`` tail removed (a stage script started by hand
       inside a temporary workspace still tracks into the project);
    3. otherwise ``cwd`` itself (stages run with cwd = repo root).

    Args:
        cwd: the working directory (default: the process's).
        env: the environment (default: ``os.environ``).

    Returns:
        An absolute, resolved path.
    """
    env = os.environ if env is None else env
    cwd = Path(cwd or Path.cwd()).resolve()
    root = env.get("DVC_ROOT")
    if root:
        dvc_root = _strip_exec_tmp(Path(root).resolve())
        if cwd == dvc_root or dvc_root in cwd.parents:
            return dvc_root
        log.warning("DVC_ROOT=%s does not contain the working directory %s: ignored", root, cwd)
    return _strip_exec_tmp(cwd)


def tracking_uri() -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlflow.db'}"


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


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(m in text for m in _LOCKED_MESSAGES)


def retry_locked(fn: Callable[..., _T], *args: Any, what: str = "MLflow write", **kwargs: Any) -> _T:
    """Call ``fn(*args, **kwargs)``, retrying while the SQLite store reports "database is locked".

    MLflow already waits up to 20 s per statement (``PRAGMA busy_timeout = 20000``); a writer that
    still loses (a long transaction of another worker, the first-time schema migration of a new
    database) gets ``RETRY_ATTEMPTS`` more tries with exponential backoff instead of failing the
    stage. Other errors propagate at once.
    """
    sleep = RETRY_FIRST_SLEEP_S
    for attempt in range(RETRY_ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == RETRY_ATTEMPTS or not _is_locked(exc):
                raise
            log.warning(
                "%s: database locked, retry %d/%d in %.0f s", what, attempt + 1, RETRY_ATTEMPTS, sleep
            )
            time.sleep(sleep)
            sleep *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


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


def _mlflow():
    """Import mlflow on first use, pointed at :func:`tracking_uri`, with its INFO chatter silenced."""
    import mlflow

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _truncate(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_client(uri: str) -> MlflowClient:
    """An ``MlflowClient`` on ``uri``; for SQLite, opened under a per-database inter-process lock.

    The client opens the store at once, and a new SQLite database gets MLflow's schema migrations
    there. Two workers creating the same database at the same moment (``dvc queue start -j 2`` on
    a fresh clone) race in them ("duplicate column name", "Online migration expected to match one
    row"), so the opening is serialised. The lock file lives in the system temp dir, keyed by the
    database path, not next to the database: an untracked file in the repo would make every later
    run ``git.dirty``.
    """
    import tempfile

    from filelock import FileLock  # a dependency of torch
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:"):
        return retry_locked(MlflowClient, tracking_uri=uri, what="open the tracking store")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"unlearnflow-mlflow-{key}.lock", timeout=300):
        return retry_locked(MlflowClient, tracking_uri=uri, what="open the tracking store")


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """Get or create experiment ``name``; a new one stores artifacts under ``<project root>/mlruns``."""
    from mlflow.exceptions import MlflowException

    exp = retry_locked(client.get_experiment_by_name, name, what="get experiment")
    if exp is None:
        local = urlparse(uri).scheme not in _REMOTE_SCHEMES
        location = (project_root() / "mlruns").as_uri() if local else None
        try:
            return retry_locked(client.create_experiment, name, artifact_location=location)
        except MlflowException:  # created meanwhile by a concurrent stage
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        retry_locked(client.restore_experiment, exp.experiment_id)
    return exp.experiment_id


def close_dead_runs(client: MlflowClient, experiment_id: str, dvc_stage: str) -> list[str]:
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
            f"closed by the next run of {dvc_stage} (pid {os.getpid()})"
        )
        retry_locked(client.set_tag, run.info.run_id, KILLED_TAG, why)
        retry_locked(client.set_terminated, run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) marked KILLED: %s", run.info.run_name, run.info.run_id, why)
        closed.append(run.info.run_id)
    return closed


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

    Per-step metrics are buffered and written in batches (every ``FLUSH_EVERY_METRICS`` values or
    ``FLUSH_EVERY_SECONDS``, and when the run ends), so :meth:`log_metrics` is cheap to call every step.
    """

    def __init__(
        self,
        client: MlflowClient,
        *,
        run_id: str,
        experiment_id: str,
        experiment: str,
        uri: str,
        stage: str,
        item: str | None,
        run_name: str,
        params_hash: str,
    ) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.experiment = experiment
        self.tracking_uri = uri
        self.stage = stage
        self.item = item
        self.run_name = run_name
        self.params_hash = params_hash
        self._params: dict[str, str] = {}
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step`` (per-step) or without one (final, stored at step 0).

        ``None`` values are skipped; NaN and inf are kept. Values go through ``float()``, so 0-d
        tensors and numpy scalars are fine. Writes are buffered (see the class docstring).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._pending.append(Metric(key, float(value), now, int(step or 0)))
        if (
            len(self._pending) >= FLUSH_EVERY_METRICS
            or time.monotonic() - self._last_flush >= FLUSH_EVERY_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics now."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        for i in range(0, len(pending), METRICS_PER_BATCH):
            retry_locked(self._client.log_batch, self.run_id, metrics=pending[i : i + METRICS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params flattened to dotted keys (values as strings, truncated to MLflow's limit).

        Re-logging a key with the same value is a no-op; with a different value it raises
        ``ValueError`` (MLflow params are immutable).
        """
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for key, value in flatten(params).items():
            text = _truncate(value, MAX_PARAM_VALUE_LEN)
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                raise ValueError(f"param {key!r} already logged as {old!r}, cannot change it to {text!r}")
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            retry_locked(self._client.log_batch, self.run_id, params=items[i : i + PARAMS_PER_BATCH])
        self._params.update(new)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values as strings, truncated to MLflow's limit)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, _truncate(v, MAX_TAG_VALUE_LEN)) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            retry_locked(self._client.log_batch, self.run_id, tags=items[i : i + PARAMS_PER_BATCH])

    def log_health(self, flags: Sequence[str]) -> None:
        """Tag the run's training health: ``unlearnflow.health`` = the flags joined by "; ", or "ok"."""
        self.set_tags({HEALTH_TAG: "; ".join(flags) or "ok"})

    def log_dataset(self, path: Path, name: str, context: str) -> None:
        """Log a split file as a run input: source = its absolute path, digest = sha256[:16].

        Only metadata is logged (``MetaDataset``), never the data itself.

        Args:
            path: the split file (e.g. ``data/splits/forget10.jsonl``).
            name: dataset name shown in MLflow (e.g. ``forget10``).
            context: how the stage uses it (e.g. ``forget``, ``retain``, ``eval``).
        """
        import mlflow
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset

        path = Path(path).resolve()
        # A LocalArtifactDatasetSource; resolve_dataset_source(str) would warn that "local" is ambiguous.
        source = get_dataset_source_from_json(json.dumps({"uri": str(path)}), source_type="local")
        dataset = MetaDataset(source, name=name, digest=sha256_file(path)[:16])
        # The fluent call logs to the active run, which stage_run made this one.
        retry_locked(mlflow.log_input, dataset, context=context, what="log input")

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
            self._client.log_artifacts(self.run_id, str(path), artifact_path="checkpoint")
        else:
            log.info("checkpoint %s is %.1f MB > %.1f MB: tagged, not logged", path, size_mb, max_mb)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file (or every file of a directory) as artifacts, under ``artifact_path`` if given."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

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

    The run is also MLflow's active run, so ``mlflow.log_*`` calls inside the block land in it.

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
    mlflow = _mlflow()

    uri = tracking_uri()
    client = _open_client(uri)
    exp_id = _experiment_id(client, experiment, uri)
    run_name = f"{stage}-{item}" if item else stage
    # DVC names the running stage itself (matrix items by their values: unlearn@grad_diff-adamw-0,
    # evaluate_base@target); outside DVC the name is rebuilt from the stage and item.
    dvc_stage = os.environ.get("DVC_STAGE") or (f"{stage}@{item}" if item else stage)
    commit, dirty = git_state()
    phash = params_hash(params)
    tags = {
        "git.commit": commit,
        "git.dirty": dirty,
        "dvc.stage": dvc_stage,
        "params.hash": phash,
        "unlearnflow.stage": stage,
        "unlearnflow.item": item or "",
        **dvc_experiment_tags(),
        **process_tags(),
        **_upstream_tags(upstream, uri),
    }
    close_dead_runs(client, exp_id, dvc_stage)
    active = retry_locked(
        mlflow.start_run, experiment_id=exp_id, run_name=run_name, tags=tags, what="start run"
    )
    run = StageRun(
        client,
        run_id=active.info.run_id,
        experiment_id=exp_id,
        experiment=experiment,
        uri=uri,
        stage=stage,
        item=item,
        run_name=run_name,
        params_hash=phash,
    )
    log.info("MLflow run %s (%s) in experiment %r at %s", run_name, run.run_id, experiment, uri)
    try:
        run.log_params(params)
        yield run
        run.flush()
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):  # never mask the original error
            run.flush()
            run.set_tags({"unlearnflow.error": f"{type(exc).__name__}: {exc}"})
        retry_locked(mlflow.end_run, status, what="end run")
        raise
    retry_locked(mlflow.end_run, "FINISHED", what="end run")
