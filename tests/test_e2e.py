"""End to end: `dvc repro` on a shrunken params file in a temporary git repo, then `dvc exp run -S`."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, eval_dir

pytestmark = pytest.mark.e2e

SHRINK = {
    "benchmark": {
        "synthetic": {
            "n_authors": 10,
            "n_holdout_authors": 2,
            "qa_per_attribute": 1,
            "n_real_authors": 4,
            "n_world_facts": 4,
        }
    },
    "model": {
        "max_length": 64,
        "scratch": {
            "vocab_size": 400,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 64,
        },
    },
    "finetune": {"epochs": 3, "batch_size": 16, "warmup_steps": 2, "log_every": 1},
    # Two seeds: the seed axis, cheaply. pdu: a method with its own state (λ) and a dynamics figure.
    "unlearn": {
        # pdu: a method with its own state (λ) and a dynamics figure; zo_adam: a gradient-free
        # optimizer through every stage (its own epochs, cut to 1 here).
        "pairs": [
            {"method": "grad_diff", "optimizer": "adamw"},
            {"method": "pdu", "optimizer": "adamw"},
            {"method": "grad_diff", "optimizer": "zo_adam"},
        ],
        "optimizer_args": {"zo_adam": {"epochs": 1}},
        "epochs": 1,
        "batch_size": 4,
        "seeds": [0, 1],
    },
    # bitsandbytes 4-bit and relearning on every unlearned model; both also on target and oracle.
    "attack": {
        "names": ["none", "quantize_4bit", "relearn"],
        "controls": ["quantize_4bit", "relearn"],
        "relearn": {"n": 2, "steps": [1, 2], "batch_size": 2},
    },
    "evaluate": {"max_new_tokens": 8},
}
PAIRS = (("grad_diff", "adamw"), ("pdu", "adamw"), ("grad_diff", "zo_adam"))
SEEDS = (0, 1)
ATTACKS = ("none", "quantize_4bit", "relearn")
CONTROLS = tuple(f"{b}-{a}" for b in ("target", "oracle") for a in ("quantize_4bit", "relearn"))
MIA_AUCS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_pp", "mia_grad_norm", "mia_reference")


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def new_repo(path: Path, params: dict, message: str) -> tuple[dict[str, str], list[str]]:
    """A fresh git + DVC repo at ``path`` holding the project's pipeline files and ``params``."""
    for item in ("dvc.yaml", "stages", "src", "inputs", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(
                src,
                path / item,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
                dirs_exist_ok=True,
            )
        else:
            shutil.copy(src, path / item)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "GIT_AUTHOR_NAME": "e2e",
        "GIT_AUTHOR_EMAIL": "e2e@example.invalid",
        "GIT_COMMITTER_NAME": "e2e",
        "GIT_COMMITTER_EMAIL": "e2e@example.invalid",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q", "-b", "main"], path, env)
    sh([*dvc, "init", "-q"], path, env)
    sh(["git", "add", "-A"], path, env)
    sh(["git", "commit", "-qm", message], path, env)
    return env, dvc


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A fresh repo with a shrunken params.yaml, after `dvc repro`."""
    repo = tmp_path_factory.mktemp("e2e")
    env, dvc = new_repo(repo, merge(yaml.safe_load((ROOT / "params.yaml").read_text()), SHRINK), "pipeline")
    out = sh([*dvc, "repro"], repo, env)
    return repo, env, dvc, out


def unlearn_names() -> list[str]:
    return [f"{m}-{o}-s{s}" for m, o in PAIRS for s in SEEDS]


def item_names() -> list[str]:
    return [f"{u}-{a}" for u in unlearn_names() for a in ATTACKS]


def test_repro_writes_the_report(repo):
    path, _, _, _ = repo
    summary = json.loads((path / "reports" / "summary.json").read_text())
    rows = summary["runs"]
    assert [r["model"] for r in rows[:2]] == ["target", "oracle"]
    unlearned = [(r["method"], r["optimizer"], r["attack"], r["seed"]) for r in rows[2:]]
    assert sorted(unlearned) == sorted((m, o, a, s) for m, o in PAIRS for a in ATTACKS for s in SEEDS)
    groups = summary["groups"][2:]
    assert {(g["method"], g["optimizer"], g["attack"], g["n"]) for g in groups} == {
        (m, o, a, 2) for m, o in PAIRS for a in ATTACKS
    }
    assert all(g["health_recorded"] == 2 for g in groups)  # every unlearn item wrote health.json
    for row in rows:
        for split in ("forget", "retain", "real_authors", "world_facts"):
            for metric in ("prob", "rouge", "truth_ratio"):
                value = row[f"{split}_{metric}"]
                assert 0.0 <= value <= 1.0, (row["model"], split, metric, value)
        assert 0.0 <= row["model_utility"] <= 1.0
        assert 0.0 <= row["forget_quality"] <= 1.0
        for key in ("forget_exact_memorization", "forget_extraction_strength", *MIA_AUCS):
            assert 0.0 <= row[key] <= 1.0, (row["model"], key, row[key])
        assert -100.0 <= row["privleak"] <= 100.0
    oracle = rows[1]
    assert oracle["forget_quality"] == 1.0, "the oracle is its own reference"
    assert oracle["mia_reference"] == 0.5 and oracle["privleak"] == pytest.approx(0.0, abs=1e-6)
    table = (path / "reports" / "report.md").read_text()
    assert "forget_quality" in table and "grad_diff" in table
    assert "## Methods" in table and "| pdu | adamw | 0, 1 |" in table
    assert "quantize_4bit" in table and "relearn" in table
    for png in ("tradeoff.png", "dynamics-pdu.png", "robustness-quantize.png", "relearn.png"):
        assert (path / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not (path / "reports" / "dynamics-grad_diff.png").exists()  # no diagnostics to plot
    # The per-fact answer to the request: a verdict per model atop the report, fact by fact beside it.
    assert "facts no longer produced" in table.split("## ")[0]
    assert "## grad_diff-adamw-s0" in (path / "reports" / "facts.md").read_text()
    state = json.loads((path / "unlearned" / "pdu-adamw-s0" / "method_state.json").read_text())
    assert state["lambda"] >= 0.0


def test_metrics_and_per_sample_files(repo):
    path, _, _, _ = repo
    for name in ["target", "oracle", *item_names(), *CONTROLS]:
        out = eval_dir(path, name)
        metrics = json.loads((out / "metrics.json").read_text())
        assert {
            "forget_quality",
            "model_utility",
            "forget_prob",
            "retain_rouge",
            "facts_leaked",
        } <= metrics.keys()
        samples = out / "samples"
        forget = [json.loads(line) for line in (samples / "forget.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["truth_ratio"]) for r in forget)
        assert {r["fact_outcome"] for r in forget} <= {"leaked", "refused", "degenerate", "wrong"}
        if name.endswith("-relearn"):
            # Relearning's pool (half the forget rows) is never evaluated; its curve is on the rest.
            info = json.loads((out / "info.json").read_text())
            pool = set(info["exclude"]["forget"])
            assert len(pool) == 4 and len(forget) == 4 and not pool & {r["index"] for r in forget}
            assert set(info["trained_rows"]["forget"]) <= pool
            assert [p["step"] for p in info["curve"]] == [0, 1, 2] and info["attack_kind"] == "relearn"
        else:
            assert len(forget) == 8
        assert (samples / "run.json").exists()
    # Attacks run in memory: no attacked checkpoint is written, only evaluations.
    assert not (path / "attacked").exists()
    for name in unlearn_names():
        change = json.loads((path / "unlearned" / name / "weight_change.json").read_text())
        assert change["rel_change"] > 0 and 0 <= change["q4_code_change"] <= 1
    quantized = json.loads((eval_dir(path, "target-quantize_4bit") / "info.json").read_text())
    assert quantized["model"] == "target" and quantized["attack_stats"]["quantized_layers"] > 0
    manifest = json.loads((path / "data" / "splits" / "manifest.json").read_text())
    assert manifest["counts"]["forget"] == 8  # 1 author × 8 attributes × 1 template
    for model in ("models/target", "models/oracle", "unlearned/pdu-adamw-s1"):
        weights = path / model / "model.safetensors"
        mask = os.umask(0)
        os.umask(mask)
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~mask, model  # not safetensors' 0600
    # Target and oracle share one tokenizer: it is trained deterministically from the same corpus.
    assert (path / "models/target/tokenizer.json").read_bytes() == (
        path / "models/oracle/tokenizer.json"
    ).read_bytes()


def test_mlflow_has_a_finished_run_per_stage_item(repo):
    from mlflow.tracking import MlflowClient

    path, _, _, _ = repo
    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("unlearnflow-synthetic")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_name = {r.info.run_name: r for r in runs}
    expected = {
        "prepare",
        "finetune-target",
        "finetune-oracle",
        "evaluate-target",
        "evaluate-oracle",
        "report",
    }
    expected |= {f"unlearn-{u}" for u in unlearn_names()}
    expected |= {f"evaluate-{n}" for n in [*item_names(), *CONTROLS]}
    assert expected <= by_name.keys()
    assert all(r.info.status == "FINISHED" for r in runs)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    # One `dvc repro` is one parent run with every stage run nested under it.
    parents = [r for r in runs if r.data.tags["unlearnflow.stage"] == "pipeline"]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("repro-"), [
        p.info.run_name for p in parents
    ]
    children = [r for r in runs if r is not parents[0]]
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parents[0].info.run_id}
    assert parents[0].info.end_time >= max(r.info.end_time for r in children)
    unlearn = by_name["unlearn-grad_diff-adamw-s1"]
    assert unlearn.data.tags["unlearnflow.item"] == "grad_diff-adamw-s1"
    # The tag is DVC's own stage name, so a run can be found from `dvc exp show` / `dvc.lock`.
    assert unlearn.data.tags["dvc.stage"] == "unlearn@pair0-1"  # DVC names items by the pair's index
    assert by_name["evaluate-target"].data.tags["dvc.stage"] == "evaluate_base@target"
    assert unlearn.data.params["unlearn.seed"] == "1"
    assert unlearn.data.tags["upstream.finetune-target"] == by_name["finetune-target"].info.run_id
    assert unlearn.data.params["method.alpha"] == "1.0"
    assert len(client.get_metric_history(unlearn.info.run_id, "loss")) >= 1
    relearn = by_name["evaluate-grad_diff-adamw-s0-relearn"]
    curve = client.get_metric_history(relearn.info.run_id, "curve_forget_prob")
    assert sorted(m.step for m in curve) == [0, 1, 2]  # the recovery curve, one point per step count
    assert relearn.data.tags["dvc.stage"] == "attack@pair0-0"  # the attack item that ran it
    assert relearn.data.params["attack.name"] == "relearn" and "attack.relearn_steps" in relearn.data.metrics
    evaluation = by_name["evaluate-grad_diff-adamw-s0-none"]
    assert "forget_quality" in evaluation.data.metrics
    assert len(by_name["prepare"].inputs.dataset_inputs) >= 5


def test_a_method_override_reruns_that_method_only(repo):
    """`unlearn.method_args.pdu.lr` changes the pdu items' lr: only they (and their downstream) go stale."""
    path, env, dvc, _ = repo
    params = path / "params.yaml"
    original = params.read_text()
    changed = yaml.safe_load(original)
    changed["unlearn"]["method_args"]["pdu"]["lr"] = 1e-3
    params.write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        stale = json.loads(sh([*dvc, "status", "--json"], path, env))
    finally:
        params.write_text(original)
    unlearn = {name for name in stale if name.startswith("unlearn@")}
    # DVC names items by the pair's index: pdu is pairs[1].
    assert unlearn == {"unlearn@pair1-0", "unlearn@pair1-1"}, sorted(stale)
    assert not any(name.startswith(("unlearn@pair0", "attack@pair0")) for name in stale)


def test_exp_run_reruns_only_what_changed(repo):
    path, env, dvc, _ = repo
    # The repro's dvc.lock and metrics committed (docs/remote.md): the baseline row of `exp show`.
    sh(["git", "add", "-A"], path, env)
    sh(["git", "commit", "-qm", "repro results"], path, env)
    out = sh([*dvc, "exp", "run", "-S", "unlearn.lr=0.0005"], path, env)
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Stage 'finetune@target' didn't change, skipping" in out
    assert "Stage 'evaluate_base@oracle' didn't change, skipping" in out
    assert "Running stage 'unlearn@pair1-0'" in out  # pairs[1] = pdu × adamw, seed 0
    # The DVC metrics are the report's headline (metric first, per group), so the comparison fits a
    # terminal and --keep finds a metric by name.
    headline = json.loads((path / "metrics.json").read_text())
    assert {"forget_prob", "forget_quality", "model_utility", "facts_leaked"} <= headline.keys()
    assert {"target", "oracle", "grad_diff-adamw", "pdu-adamw-relearn"} <= headline["model_utility"].keys()
    csv = sh([*dvc, "exp", "show", "--csv", "--only-changed", "--keep", "model_utility"], path, env)
    header = csv.splitlines()[0].split(",")
    assert "model_utility.target" in header  # unchanged by the lr, kept by --keep
    assert "forget_prob.pdu-adamw" in header  # changed by the lr
    assert "forget_prob.target" not in header  # unchanged: dropped by --only-changed
    assert not any("eval/" in column for column in header)


def test_queued_experiments_track_into_the_project_store(repo):
    """Two queued experiments run by two workers both track into the repo's own mlflow.db.

    `dvc queue start` runs each experiment in a temporary clone under `.dvc/tmp/exps/` that is
    deleted afterwards; before, each tracked into the clone's mlflow.db and the runs were lost.
    Cheap: the repro results are committed (a clone holds only git-tracked files, so it reuses the
    cached upstream outputs through dvc.lock) and only the `unlearn` stage is targeted.
    """
    import time

    from mlflow.tracking import MlflowClient

    path, env, dvc, _ = repo
    sh(["git", "add", "-A"], path, env)
    sh(["git", "commit", "-qm", "repro results"], path, env)
    lrs = {"queued-lr-a": "0.0002", "queued-lr-b": "0.0004"}
    for name, lr in lrs.items():
        sh([*dvc, "exp", "run", "--queue", "--name", name, "-S", f"unlearn.lr={lr}", "unlearn"], path, env)
    sh([*dvc, "queue", "start", "-j", "2"], path, env)
    deadline = time.monotonic() + 900
    while True:  # `dvc queue status`: "<task> <name> <created> <status>" per experiment
        rows = [line.split() for line in sh([*dvc, "queue", "status"], path, env).splitlines()]
        status = {row[1]: row[-1] for row in rows if len(row) >= 4 and row[1] in lrs}
        if set(status) == set(lrs) and all(s not in ("Queued", "Running") for s in status.values()):
            break
        assert time.monotonic() < deadline, f"queue still busy after 15 min: {status}"
        time.sleep(5)
    assert status == dict.fromkeys(lrs, "Success"), sh([*dvc, "queue", "logs", next(iter(lrs))], path, env)

    client = MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("unlearnflow-synthetic")
    assert experiment.artifact_location == (path.resolve() / "mlruns").as_uri()
    for name, lr in lrs.items():
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'", max_results=100
        )
        unlearn = [r for r in runs if r.data.tags["unlearnflow.stage"] == "unlearn"]
        assert {r.data.tags["unlearnflow.item"] for r in unlearn} == set(unlearn_names()), name
        assert all(r.info.status == "FINISHED" for r in runs), name
        # zo_adam sets its own lr (unlearn.optimizer_args.zo_adam.lr), which the queued -S does not touch.
        own = {r.data.params["schedule_from.lr"] for r in unlearn}
        assert own == {"unlearn.lr", "unlearn.optimizer_args.zo_adam.lr"}, own
        assert all(
            r.data.params["unlearn.lr"] == lr
            for r in unlearn
            if r.data.params["schedule_from.lr"] == "unlearn.lr"
        ), name
        assert all(r.data.tags["dvc.exp_baseline_rev"] for r in runs), name
        # Each queued experiment is one parent run, named by the experiment, over its stage runs.
        parent = [r for r in runs if r.data.tags["unlearnflow.stage"] == "pipeline"]
        assert [r.info.run_name for r in parent] == [name]
        assert {r.data.tags.get("mlflow.parentRunId") for r in runs if r not in parent} == {
            parent[0].info.run_id
        }


def test_checkpoints_and_splits_round_trip_through_a_dvc_remote(repo, tmp_path):
    """docs/remote.md: push to a local remote, clone, pull: the clone is up to date without rerunning."""
    path, env, dvc, _ = repo
    remote = tmp_path / "remote"
    sh([*dvc, "remote", "add", "-d", "local", str(remote)], path, env)
    sh(["git", "add", "-A"], path, env)
    sh(["git", "commit", "-qm", "results and remote"], path, env)
    sh([*dvc, "push"], path, env)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    assert not (clone / "models" / "target").exists()  # checkpoints are not in git
    sh([*dvc, "pull"], clone, env)
    assert (clone / "models/target/model.safetensors").read_bytes() == (
        path / "models/target/model.safetensors"
    ).read_bytes()
    assert (clone / "data/splits/forget.jsonl").is_file()
    status = json.loads(sh([*dvc, "status", "--json"], clone, env))
    assert status == {}, status


@pytest.fixture(scope="module")
def custom_repo(tmp_path_factory):
    """A fresh repo whose benchmark is the privacy-request example copied into inputs/; prepare only."""
    repo = tmp_path_factory.mktemp("custom")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["benchmark"]["name"] = "custom"
    params["benchmark"]["custom"] |= {"forget": "inputs/forget.jsonl", "retain": "inputs/retain.jsonl"}
    (repo / "inputs").mkdir()
    for name in ("forget.jsonl", "retain.jsonl"):
        shutil.copy(ROOT / "examples" / "privacy-request" / name, repo / "inputs" / name)
    env, dvc = new_repo(repo, params, "privacy request")
    sh([*dvc, "repro", "prepare"], repo, env)
    return repo, env, dvc


def test_editing_the_forget_file_reruns_prepare(custom_repo):
    path, env, dvc = custom_repo
    assert json.loads(sh([*dvc, "status", "--json", "prepare"], path, env)) == {}
    forget = path / "inputs" / "forget.jsonl"
    rows = [json.loads(line) for line in forget.read_text().splitlines()]
    rows[0]["answer"] = rows[0]["answer"].replace("42 Larchmere Lane", "7 Larchmere Lane")
    rows[0]["secret"] = "7 Larchmere Lane, Port Alderwick"
    forget.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = json.loads(sh([*dvc, "status", "--json", "prepare"], path, env))
    assert "prepare" in status, status
    sh([*dvc, "repro", "prepare"], path, env)
    assert "7 Larchmere Lane" in (path / "data/splits/forget.jsonl").read_text()
    assert "42 Larchmere Lane" not in (path / "data/splits/forget.jsonl").read_text()


def test_a_forget_file_outside_inputs_is_refused(custom_repo, tmp_path):
    path, env, dvc = custom_repo
    outside = tmp_path / "forget.jsonl"
    shutil.copy(path / "inputs" / "forget.jsonl", outside)
    params = path / "params.yaml"
    original = params.read_text()
    changed = yaml.safe_load(original)
    changed["benchmark"]["custom"]["forget"] = str(outside)
    params.write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        proc = subprocess.run([*dvc, "repro", "prepare"], cwd=path, env=env, capture_output=True, text=True)
    finally:
        params.write_text(original)
    assert proc.returncode != 0
    assert "outside inputs/" in proc.stdout + proc.stderr
