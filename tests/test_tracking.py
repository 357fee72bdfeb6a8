"""tracking, tracking_store, run_liveness: two chained stage runs against a SQLite store in tmp_path,
read back with MlflowClient; project root, locked-write retries, dead-run closing."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlearnflow import tracking, tracking_store
from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import sha256_dir, sha256_file, write_jsonl
from unlearnflow.pipeline_run import PipelineExecution, pipeline_execution
from unlearnflow.run_liveness import close_dead_runs
from unlearnflow.tracking import flatten, params_hash, read_manifest, stage_run
from unlearnflow.tracking_store import project_root, retry_locked, tracking_uri

EXPERIMENT = "unlearnflow-test"
PARAMS = {
    "unlearn": {
        "lr": 1e-5,
        "methods": ["grad_ascent", "npo"],
        "method_args": {"grad_diff": {"alpha": 0.5}, "grad_ascent": {}},
    },
    "seed": 0,
    "note": "x" * 7000,  # longer than MLflow's 6000-character param limit
}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating one runs MLflow's migrations (about 2 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db: str) -> Path:
    """cwd = tmp_path/work, tracked in ``db``, and git cannot find a repository above tmp_path."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):  # pytest under dvc
        monkeypatch.delenv(name, raising=False)
    return work


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_flatten_by_hand() -> None:
    nested = {"a": {"b": {"c": 1}, "d": [1, "x"], "e": {}}, "f": None, "g": (2.5,)}
    assert flatten(nested) == {"a.b.c": 1, "a.d": '[1, "x"]', "a.e": "{}", "f": None, "g": "[2.5]"}
    assert flatten({"k": 1}, prefix="p") == {"p.k": 1}


def test_params_hash_is_canonical() -> None:
    assert params_hash({"a": 1, "b": {"c": 2}}) == params_hash({"b": {"c": 2}, "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
    assert len(params_hash({})) == 16


def test_importing_the_tracking_modules_loads_neither_mlflow_nor_torch() -> None:
    """Every stage imports them; mlflow (about 2 s) and psutil load only when a run starts."""
    code = (
        "import sys\n"
        "import unlearnflow.run_liveness, unlearnflow.tracking, unlearnflow.tracking_store\n"
        "print(sorted(m for m in ('mlflow', 'torch', 'psutil', 'filelock') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tracking_uri_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"


@pytest.mark.parametrize(
    ("cwd", "dvc_root", "expected"),
    [
        ("proj", None, "proj"),  # plain `python stages/x.py` or `dvc repro`, cwd = root
        ("proj", "proj", "proj"),  # dvc repro / dvc exp run in the workspace: DVC_ROOT = root
        ("proj/sub", "proj", "proj"),  # a stage with its own wdir
        # dvc queue start: cwd is the executor's clone, DVC_ROOT the parent repo (dvc 3.67)
        ("proj/.dvc/tmp/exps/tmpa1b2c3", "proj", "proj"),
        ("proj/.dvc/tmp/exps/standalone/tmpa1b2c3", "proj", "proj"),  # dvc exp run --temp
        # a DVC that left DVC_ROOT at the clone, or a stage started by hand in one: strip the tail
        ("proj/.dvc/tmp/exps/tmpa1b2c3", "proj/.dvc/tmp/exps/tmpa1b2c3", "proj"),
        ("proj/.dvc/tmp/exps/tmpa1b2c3/sub", None, "proj"),
        ("proj", "elsewhere", "proj"),  # a stray DVC_ROOT that does not contain cwd is ignored
        ("proj/.dvcx/tmp/exps/t", None, "proj/.dvcx/tmp/exps/t"),  # only the exact .dvc/tmp/exps
    ],
)
def test_project_root(tmp_path: Path, cwd: str, dvc_root: str | None, expected: str) -> None:
    env = {"DVC_ROOT": str(tmp_path / dvc_root)} if dvc_root else {}
    assert project_root(tmp_path / cwd, env) == (tmp_path / expected).resolve()


def test_queued_experiment_tracks_into_the_project_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage of a queued experiment runs in ``<root>/.dvc/tmp/exps/tmpXXXX`` with DVC_ROOT = <root>:
    its run, the experiment's artifact location and the manifest's URI are the root's."""
    root = tmp_path / "proj"
    clone = root / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
    clone.mkdir(parents=True)
    monkeypatch.chdir(clone)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-hens")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    (clone / "ckpt").mkdir()
    (clone / "ckpt" / "w.bin").write_bytes(b"\1" * 16)
    with stage_run("unlearn", "grad_ascent-adamw", experiment=EXPERIMENT, params={}) as run:
        run.log_checkpoint(clone / "ckpt", max_mb=1.0)
    uri = f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert run.tracking_uri == uri and (root / "mlflow.db").is_file()
    assert not (clone / "mlflow.db").exists() and not (clone / "mlruns").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run.run_id)
    assert got.data.tags["dvc.exp_name"] == "sunny-hens"
    assert got.data.tags["dvc.exp_baseline_rev"] == "a" * 40
    assert client.get_experiment(run.experiment_id).artifact_location == (root.resolve() / "mlruns").as_uri()
    assert (root / "mlruns" / run.run_id / "artifacts" / "checkpoint" / "w.bin").is_file()


def test_plain_repro_has_no_experiment_tags(workdir: Path) -> None:
    with stage_run("prepare", None, experiment=f"{EXPERIMENT}-plain", params={}) as run:
        pass
    tags = _client().get_run(run.run_id).data.tags
    assert "dvc.exp_name" not in tags and "dvc.exp_baseline_rev" not in tags
    assert tags["unlearnflow.host"] and tags["unlearnflow.pid"] == str(os.getpid())


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_closes_runs_of_dead_processes_only(workdir: Path) -> None:
    """Four RUNNING runs, as a `kill -9` leaves them; only the one of this item whose process is
    gone from this host is closed, as KILLED with a reason, by the next run of the item."""
    import psutil

    client = _client()
    experiment = f"{EXPERIMENT}-killed"  # its own: the chained test checks where EXPERIMENT's artifacts go
    exp_id = client.create_experiment(experiment)
    host = socket.gethostname()
    stage = "unlearn@npo-sgd"
    live = subprocess.Popen(["sleep", "60"])
    try:
        live_start = f"{psutil.Process(live.pid).create_time():.3f}"

        def running(stage_tag: str, host_tag: str, pid: int, start: str | None) -> str:
            tags = {"dvc.stage": stage_tag, "unlearnflow.host": host_tag, "unlearnflow.pid": str(pid)}
            if start is not None:
                tags["unlearnflow.pid_start"] = start
            return client.create_run(exp_id, tags=tags).info.run_id

        dead = running(stage, host, _dead_pid(), None)
        alive = running(stage, host, live.pid, live_start)  # e.g. the same item in another worker
        reused = running(stage, host, live.pid, "1.000")  # the pid now belongs to a later process
        remote = running(stage, "another-host.invalid", _dead_pid(), None)  # cannot be checked
        other_item = running("unlearn@npo-adamw", host, _dead_pid(), None)
        with stage_run("unlearn", "npo-sgd", experiment=experiment, params={}) as run:
            pass
        status = {r: client.get_run(r).info.status for r in (dead, alive, reused, remote, other_item)}
        assert status == {
            dead: "KILLED",
            alive: "RUNNING",
            reused: "KILLED",
            remote: "RUNNING",
            other_item: "RUNNING",
        }
        why = client.get_run(dead).data.tags["unlearnflow.killed"]
        assert "ended without closing the run" in why and str(os.getpid()) in why
        assert client.get_run(run.run_id).info.status == "FINISHED"
        assert close_dead_runs(client, exp_id, stage) == []  # nothing left to close
    finally:
        live.kill()
        live.wait()
        for run_id in (alive, remote, other_item):
            client.set_terminated(run_id, "KILLED")


def test_retry_locked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Locked errors are retried (here twice, then success); anything else raises at once; the
    last locked error propagates after RETRY_ATTEMPTS retries."""
    import sqlite3

    monkeypatch.setattr(tracking_store, "RETRY_FIRST_SLEEP_S", 0.0)
    calls = []

    def flaky(x: int, fail: int, exc: Exception) -> int:
        calls.append(x)
        if len(calls) <= fail:
            raise exc
        return x * 2

    locked = sqlite3.OperationalError("database is locked")
    assert retry_locked(flaky, 21, fail=2, exc=locked) == 42 and len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError, match="bad"):
        retry_locked(flaky, 1, fail=1, exc=ValueError("bad"))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_locked(flaky, 1, fail=100, exc=locked)
    assert len(calls) == tracking_store.RETRY_ATTEMPTS + 1


def test_two_chained_stages_in_git_repo(workdir: Path, tmp_path: Path) -> None:
    _git(workdir, "init", "-q")
    (workdir / ".gitignore").write_text("mlruns/\n")
    _git(workdir, "add", ".gitignore")
    _git(workdir, "commit", "-q", "-m", "init")
    head = _git(workdir, "rev-parse", "HEAD")
    split = tmp_path / "forget.jsonl"
    write_jsonl(split, [{"question": "q", "answer": "a"}])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0" * 2048)
    manifest = tmp_path / "finetune" / "run.json"

    with stage_run("finetune", "target", experiment=EXPERIMENT, params=PARAMS) as first:
        for step in range(5):
            first.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": None}, step=step)
        first.log_metrics({"final_loss": float("nan")})
        first.log_dataset(split, name="forget10", context="forget")
        first.log_checkpoint(ckpt, max_mb=1.0)
        first.write_manifest(manifest)

    (workdir / "untracked.txt").write_text("dirty\n")
    upstream = [manifest, tmp_path / "missing" / "run.json"]  # a missing manifest is skipped
    with stage_run(
        "unlearn", "grad_ascent-adamw", experiment=EXPERIMENT, params={}, upstream=upstream
    ) as second:
        second.log_checkpoint(ckpt, max_mb=0.001)

    client = _client()
    run1, run2 = client.get_run(first.run_id), client.get_run(second.run_id)
    assert (run1.info.run_name, run2.info.run_name) == ("finetune-target", "unlearn-grad_ascent-adamw")
    assert (run1.info.status, run2.info.status) == ("FINISHED", "FINISHED")

    tags1, tags2 = run1.data.tags, run2.data.tags
    assert tags1["git.commit"] == head and tags1["git.dirty"] == "false"
    assert tags2["git.commit"] == head and tags2["git.dirty"] == "true"
    assert tags1["dvc.stage"] == "finetune@target" and tags2["dvc.stage"] == "unlearn@grad_ascent-adamw"
    assert tags1["params.hash"] == params_hash(PARAMS)
    assert (tags2["unlearnflow.stage"], tags2["unlearnflow.item"]) == ("unlearn", "grad_ascent-adamw")
    assert tags2["upstream.finetune-target"] == first.run_id
    assert not any(k.startswith("upstream.") for k in tags1)

    params = run1.data.params
    assert params["unlearn.method_args.grad_diff.alpha"] == "0.5"
    assert params["unlearn.methods"] == json.dumps(["grad_ascent", "npo"])
    assert params["unlearn.method_args.grad_ascent"] == "{}"
    assert params["seed"] == "0"
    assert len(params["note"]) == 6000

    history = client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (s, 1.0 / (s + 1)) for s in range(5)
    ]
    assert "grad_norm" not in run1.data.metrics
    assert run1.data.metrics["final_loss"] != run1.data.metrics["final_loss"]  # NaN kept

    (ds_input,) = run1.inputs.dataset_inputs
    assert ds_input.dataset.name == "forget10"
    assert ds_input.dataset.digest == sha256_file(split)[:16]
    assert json.loads(ds_input.dataset.source)["uri"] == str(split.resolve())
    assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == "forget"

    for tags in (tags1, tags2):
        assert tags["checkpoint.path"] == str(ckpt)
        assert tags["checkpoint.sha256"] == sha256_dir(ckpt)
        assert float(tags["checkpoint.mb"]) == pytest.approx(2048 / 2**20, abs=1e-3)
    assert [f.path for f in client.list_artifacts(first.run_id, "checkpoint")] == [
        "checkpoint/model.safetensors"
    ]
    assert client.list_artifacts(second.run_id) == []  # above max_mb: tagged only
    assert (workdir / "mlruns" / first.run_id / "artifacts" / "checkpoint").is_dir()

    assert read_manifest(manifest) == {
        "run_id": first.run_id,
        "experiment_id": run1.info.experiment_id,
        "experiment": EXPERIMENT,
        "tracking_uri": tracking_uri(),
        "stage": "finetune",
        "item": "target",
        "run_name": "finetune-target",
        "params_hash": params_hash(PARAMS),
    }


def test_failure_marks_run_failed_and_reraises(workdir: Path) -> None:
    import mlflow

    with (
        pytest.raises(RuntimeError, match="boom"),
        stage_run("prepare", None, experiment=EXPERIMENT, params={"seed": 1}) as run,
    ):
        run.log_metrics({"rows": 3.0}, step=0)
        raise RuntimeError("boom")

    got = _client().get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.info.run_name == "prepare"
    assert got.data.tags["dvc.stage"] == "prepare"
    assert (got.data.tags["git.commit"], got.data.tags["git.dirty"]) == ("none", "none")  # not a repo
    assert got.data.tags["unlearnflow.error"] == "RuntimeError: boom"
    assert got.data.metrics["rows"] == 3.0  # buffered metrics are flushed before the run ends
    assert mlflow.active_run() is None


def test_malformed_upstream_manifest_is_a_user_error(workdir: Path) -> None:
    bad = workdir / "run.json"
    bad.write_text('{"checkpoint": "mine"}\n')
    with (
        pytest.raises(UnlearnflowError, match=r"not a run\.json manifest"),
        stage_run("unlearn", "npo-adamw", experiment=EXPERIMENT, params={}, upstream=[bad]),
    ):
        pass


def test_two_processes_create_a_fresh_store_at_once(tmp_path: Path) -> None:
    """Two stage processes start together on a project without mlflow.db (`dvc queue start -j 2` on
    a fresh clone): both must finish their runs. Unserialised, MLflow's schema migrations of the new
    SQLite file race ("duplicate column name: step") and one stage dies."""
    script = (
        "import sys\n"
        "from unlearnflow.tracking import stage_run\n"
        "with stage_run('prepare', sys.argv[1], experiment='race', params={'a': 1}) as run:\n"
        "    run.log_metrics({'x': 1.0}, step=0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, item], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
        for item in ("a", "b")
    ]
    errors = [p.communicate()[1].decode()[-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("prepare-a", "FINISHED"),
        ("prepare-b", "FINISHED"),
    ]


def test_experiments_are_of_the_traditional_ml_kind(workdir: Path) -> None:
    """MLflow 3 opens an experiment without ``mlflow.experimentKind`` on its GenAI overview: a
    created experiment gets the traditional-ML kind, an older one without a kind gets it on its
    next run, and a kind a user chose is kept."""
    client = _client()
    kind = tracking_store.EXPERIMENT_KIND_TAG
    with stage_run("prepare", None, experiment=f"{EXPERIMENT}-kind-new", params={}) as run:
        pass
    assert client.get_experiment(run.experiment_id).tags[kind] == "custom_model_development"
    old = client.create_experiment(f"{EXPERIMENT}-kind-old")
    chosen = client.create_experiment(f"{EXPERIMENT}-kind-chosen", tags={kind: "genai_development"})
    assert kind not in client.get_experiment(old).tags
    for name in (f"{EXPERIMENT}-kind-old", f"{EXPERIMENT}-kind-chosen"):
        with stage_run("prepare", None, experiment=name, params={}):
            pass
    assert client.get_experiment(old).tags[kind] == "custom_model_development"
    assert client.get_experiment(chosen).tags[kind] == "genai_development"


class _Proc:
    """A stand-in for ``psutil.Process``: what ``pipeline_execution`` reads of an ancestor."""

    def __init__(self, pid: int, cmdline: list[str], start: float) -> None:
        self.pid, self._cmdline, self._start = pid, cmdline, start

    def cmdline(self) -> list[str]:
        return self._cmdline

    def create_time(self) -> float:
        return self._start


def test_pipeline_execution_is_the_nearest_dvc_ancestor() -> None:
    """A queued experiment's stage: shell ← ``dvc exp exec-run`` ← the queue worker. The key is the
    exec-run's host, pid and start time; the name is the experiment's, else ``repro-<start>``.
    Without DVC_STAGE (a stage run by hand) or without a dvc ancestor there is no execution, and
    "dvc" as a later argument (``pytest -k dvc``) is not the dvc command."""
    shell = _Proc(30, ["/bin/bash", "--noprofile", "--norc", "-c", "python stages/prepare.py"], 3.0)
    exec_run = _Proc(20, ["/v/bin/python", "/v/bin/dvc", "exp", "exec-run", "--infofile", "i"], 1000.5)
    worker = _Proc(10, ["dvc", "exp", "queue-worker"], 5.0)
    env = {"DVC_STAGE": "prepare", "DVC_EXP_NAME": "sunny-hens"}
    got = pipeline_execution(env, [shell, exec_run, worker])
    assert got == PipelineExecution(f"{socket.gethostname()}:20:1000.500", "sunny-hens", 1_000_500)
    repro = pipeline_execution(
        {"DVC_STAGE": "prepare"}, [shell, _Proc(7, ["python", "-m", "dvc", "repro"], 0.0)]
    )
    assert repro is not None and repro.name == time.strftime("repro-%Y%m%d-%H%M%S", time.localtime(0.0))
    assert pipeline_execution({}, [shell, exec_run]) is None
    assert pipeline_execution({"DVC_STAGE": "prepare"}, [shell]) is None
    assert (
        pipeline_execution({"DVC_STAGE": "prepare"}, [_Proc(5, ["python", "-m", "pytest", "-k", "dvc"], 1.0)])
        is None
    )


def test_pipeline_execution_key_is_the_real_dvc_process(tmp_path: Path) -> None:
    """Real processes: a script named ``dvc`` starts two stage-like children through a shell, as DVC
    does; both see one key naming the script's pid, and a second ``dvc`` process gives another."""
    stage = tmp_path / "stage.py"
    stage.write_text(
        "from unlearnflow.pipeline_run import pipeline_execution\nprint(pipeline_execution().key)\n"
    )
    dvc = tmp_path / "dvc"  # started through its shebang, as the console script is
    dvc.write_text(
        f"#!{sys.executable}\nimport subprocess\n"
        f"for _ in range(2):\n    subprocess.run(['/bin/sh', '-c', '{sys.executable} {stage}'], check=True)\n"
    )
    dvc.chmod(0o755)
    env = {**os.environ, "DVC_STAGE": "prepare"}
    keys = []
    for _ in range(2):
        proc = subprocess.Popen([str(dvc)], env=env, stdout=subprocess.PIPE, text=True)
        out = proc.communicate()[0].split()
        assert proc.returncode == 0 and len(out) == 2 and out[0] == out[1], out
        assert out[0].split(":")[1] == str(proc.pid)
        keys.append(out[0])
    assert keys[0] != keys[1]


def test_stage_runs_of_one_execution_share_one_parent(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stage runs of execution A nest under one parent named by A; execution B gets its own;
    a run outside DVC has no parent. The parent is never RUNNING: it starts when the DVC process
    started, ends with its last stage, and turns FAILED when a stage fails (a later success keeps it)."""
    client = _client()
    experiment = f"{EXPERIMENT}-pipeline"
    a = PipelineExecution("host:1:1.000", "sunny-hens", 1_000)
    b = PipelineExecution("host:2:2.000", "repro-19700101-000002", 2_000)
    current: dict[str, PipelineExecution | None] = {"execution": a}
    monkeypatch.setattr(tracking, "pipeline_execution", lambda: current["execution"])

    def run(stage: str, execution: PipelineExecution | None, fail: bool = False):
        current["execution"] = execution
        with contextlib.suppress(RuntimeError), stage_run(stage, None, experiment=experiment, params={}) as r:
            if fail:
                raise RuntimeError("boom")
        return client.get_run(r.run_id)

    first, second, other, alone = (
        run("prepare", a),
        run("finetune", a),
        run("prepare", b),
        run("prepare", None),
    )
    parent_id = first.data.tags["mlflow.parentRunId"]
    assert second.data.tags["mlflow.parentRunId"] == parent_id
    assert other.data.tags["mlflow.parentRunId"] not in (parent_id, None)
    assert "mlflow.parentRunId" not in alone.data.tags
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "sunny-hens" and parent.data.tags["unlearnflow.stage"] == "pipeline"
    assert parent.info.status == "FINISHED" and parent.info.start_time == 1_000
    assert parent.info.end_time >= second.info.end_time
    assert client.get_run(other.data.tags["mlflow.parentRunId"]).info.run_name == b.name
    exp_id = first.info.experiment_id
    assert len(client.search_runs([exp_id], filter_string=f"tags.`unlearnflow.pipeline` = '{a.key}'")) == 1

    failed = PipelineExecution("host:3:3.000", "repro-failed", 3_000)
    broken = run("prepare", failed, fail=True)
    assert broken.info.status == "FAILED"
    run("finetune", failed)  # `dvc repro --keep-going` runs on after a failure
    assert client.get_run(broken.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
