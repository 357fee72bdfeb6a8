"""Start-up cost of a stage process (issue 13): no heavy module at import, and MLflow off the stage's
path (its calls run in the tracking worker, unlearnflow/tracking_worker.py).

The import check runs in one fresh interpreter (imports are expensive, and this test process has
long imported everything); the time itself is measured by bench/startup.py, not asserted here.
torch is not on the list: every stage that trains or evaluates needs it before its first work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlearnflow.tracking import stage_run
from unlearnflow.tracking_worker import TrackingError

ROOT = Path(__file__).resolve().parents[1]
# Loaded by a stage when it needs them, never by importing a stage script or a library module.
HEAVY = (
    "transformers",
    "mlflow",
    "datasets",
    "scipy",
    "sklearn",
    "matplotlib",
    "rouge_score",
    "nltk",
    "accelerate",
    "peft",
    "bitsandbytes",
    "pandas",
)
# Imports every stage script and every module of the package (found on disk: pkgutil's walk would
# import the packages before they are measured), and prints the heavy modules each import added.
_PROBE = """
import importlib, importlib.util, json, sys
from pathlib import Path
import unlearnflow

root, heavy = Path({root!r}), {heavy!r}
src = Path(unlearnflow.__file__).parent
targets = [str(p.relative_to(root)) for p in sorted((root / "stages").glob("*.py"))]
targets += [
    ".".join(("unlearnflow", *p.relative_to(src).with_suffix("").parts)).removesuffix(".__init__")
    for p in sorted(src.rglob("*.py"))
]
added = {{}}
for target in targets:
    before = {{h for h in heavy if h in sys.modules}}
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location("stage_" + Path(target).stem, root / target)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
        importlib.import_module(target)
    added[target] = sorted(h for h in heavy if h in sys.modules and h not in before)
print(json.dumps(added))
"""


def test_stages_and_library_import_no_heavy_module() -> None:
    """In one fresh interpreter: no stage script and no module of the package loads a heavy module
    when imported (each is blamed for what its own import added)."""
    code = _PROBE.format(heavy=HEAVY, root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    added = json.loads(out.stdout.splitlines()[-1])
    assert {
        "stages/unlearn.py",
        "stages/evaluate.py",
        "unlearnflow.tracking",
        "unlearnflow.metrics",
    } <= added.keys()
    heavy = {target: modules for target, modules in added.items() if modules}
    assert heavy == {}, f"imports that load heavy modules (load them where they are used): {heavy}"


# ---- the tracking worker -------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite store in tmp_path; cwd = tmp_path, outside any git repository or DVC run."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    return uri


def _get_run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id)


_KILLED_STAGE = """
import json, os, signal, sys
from unlearnflow.tracking import stage_run
with stage_run("prepare", None, experiment="startup", params={"seed": 1}) as run:
    run.log_metrics({"rows": 3.0})
    run.flush()
    seen = {"run_id": run.run_id, "mlflow": "mlflow" in sys.modules, "pid": os.getpid()}
    print(json.dumps(seen), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stage_process_never_imports_mlflow_and_its_kill_closes_the_run(store: str, tmp_path: Path) -> None:
    """A stage process with an open run (whose id it has): mlflow is not in its modules; killed with
    SIGKILL, its worker sees the pipe close and ends the run KILLED, naming the stage's pid."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_STAGE], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["mlflow"] is False
    deadline = time.monotonic() + 120  # the worker ends the run on its own, after the stage is gone
    while (got := _get_run(store, seen["run_id"])).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert got.info.status == "KILLED"
    assert f"stage process {seen['pid']} ended" in got.data.tags["unlearnflow.killed"]
    assert got.data.metrics["rows"] == 3.0  # what the stage sent before it died is kept


def test_a_store_that_cannot_open_fails_the_stage_before_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block starts before the worker has a run; the worker's failure to open the store is raised
    by the first call that needs the run (here the manifest), and nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a directory\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    manifest = tmp_path / "run.json"
    with (
        pytest.raises(TrackingError, match="start"),
        stage_run("prepare", None, experiment="startup", params={}) as run,
    ):
        run.write_manifest(manifest)
    assert not manifest.exists()


def test_a_failed_write_fails_the_run_and_the_stage(store: str) -> None:
    """A metric MLflow rejects (a name with "!"): the write fails in the worker; the stage gets a
    TrackingError (at a later call or when the run ends) and the run ends FAILED, saying why."""
    with (
        pytest.raises(TrackingError, match="bad!name"),
        stage_run("prepare", None, experiment="startup", params={}) as run,
    ):
        run.log_metrics({"bad!name": 1.0})
        run.flush()
    got = _get_run(store, run.run_id)
    assert got.info.status == "FAILED"
    assert "bad!name" in got.data.tags["unlearnflow.error"]
