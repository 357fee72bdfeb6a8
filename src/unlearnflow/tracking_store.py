"""Where the MLflow tracking store is, and how several stage processes write to it safely.

* The store is ``sqlite:///<root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set; artifacts of
  the experiments created here go under ``<root>/mlruns/``. ``<root>`` is the project root
  (:func:`project_root`), never the temporary workspace of a queued DVC experiment, so that every
  run of every experiment lands in the one store.
* SQLite with several writers (``dvc queue start -j 2``): MLflow sets ``PRAGMA busy_timeout =
  20000`` on every session (``mlflow.store.db.utils._get_managed_session_maker``); writes are
  retried on top of that when the database is still locked (:func:`retry_locked`), and a client is
  opened under an inter-process lock so that two workers never run the schema migrations of a new
  database at once (:func:`open_client`).

Used by :mod:`unlearnflow.tracking` (the stage runs) and :mod:`unlearnflow.run_liveness`. ``mlflow``
is imported lazily, inside the functions that need it, so that importing this module is free.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Schemes of a tracking server: experiments created there keep the server's artifact location.
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
# MLflow 3's UI opens an experiment on its GenAI overview (traces, evaluations) unless the experiment
# carries this tag; "custom_model_development" is its traditional-ML kind, which opens on the runs
# table (mlflow 3.17: the UI's ExperimentKind enum; assistant/skills/mlflow-onboarding/SKILL.md).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

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


def open_client(uri: str) -> MlflowClient:
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


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name`` on the store at ``uri``, created or restored if need be.

    A new experiment stores its artifacts under ``<project root>/mlruns`` (on a local store) and is
    of MLflow's traditional-ML kind (``EXPERIMENT_KIND_TAG``), so the UI opens on its runs; an
    existing one without a kind gets it (a kind a user chose is kept). One created meanwhile by a
    concurrent stage is reused; a deleted one is restored.
    """
    from mlflow.exceptions import MlflowException

    exp = retry_locked(client.get_experiment_by_name, name, what="get experiment")
    if exp is None:
        local = urlparse(uri).scheme not in _REMOTE_SCHEMES
        location = (project_root() / "mlruns").as_uri() if local else None
        try:
            return retry_locked(
                client.create_experiment,
                name,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:  # created meanwhile by a concurrent stage
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        retry_locked(client.restore_experiment, exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the kind was set, or by hand
        retry_locked(client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id
