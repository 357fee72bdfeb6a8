"""tracking: two chained stage runs against a SQLite store in tmp_path, read back with MlflowClient."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import sha256_dir, sha256_file, write_jsonl
from unlearnflow.tracking import flatten, params_hash, read_manifest, stage_run, tracking_uri

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


def test_tracking_uri_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"


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
