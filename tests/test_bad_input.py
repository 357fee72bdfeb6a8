"""Bad input through the stage CLIs: one ``error:`` line and exit code 2, never a traceback; and
evaluate's outputs appear together or not at all; the attack stage's attacks (relearning among them),
each evaluated, in one process.

In process (typer's CliRunner), on a tiny synthetic benchmark and the tiny Llama of conftest, so no
subprocess pays for importing transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, load_stage
from typer.testing import CliRunner


def invoke(stage: str, args: list[str]):
    return CliRunner().invoke(load_stage(stage).app, [*args, "--params", "params.yaml"])


def assert_one_line_error(result, *expected: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert all(e in lines[0] for e in expected), lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer, make_tiny_model) -> Path:
    """A tiny synthetic benchmark prepared by the prepare stage, a saved tiny model, and params that
    keep evaluate to a few samples per split."""
    from unlearnflow.modeling import save_pretrained

    root = tmp_path_factory.mktemp("bad_input")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["benchmark"]["synthetic"].update(
        n_authors=4, n_holdout_authors=1, qa_per_attribute=1, n_real_authors=2, n_world_facts=2
    )
    params["model"]["max_length"] = 128
    # Every default metric (model_utility needs the benchmark's full set) on 2 samples per split.
    params["evaluate"].update(max_samples=2, max_new_tokens=4, knowmem_max_new_tokens=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    save_pretrained(make_tiny_model(), tiny_tokenizer, root / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        result = invoke("prepare", ["--out", "splits"])
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def cwd(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    return workdir


def evaluate_args(out: str, oracle: str = "self") -> list[str]:
    return ["x", "--model", "model", "--splits", "splits", "--oracle", oracle, "--out", out]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"index": 1, "truth_ratio": 0.5\n', "line 2: not valid JSON"),  # a line cut short
        ('{"index": 1}\n', "row 2: not an oracle per-sample row like row 1 (truth_ratio)"),
        ('{"index": "1", "truth_ratio": 0.5}\n', "row 2: not an oracle per-sample row"),
        ("[1, 0.5]\n", "line 2: expected a JSON object, got list"),
    ],
)
def test_corrupt_oracle_samples_are_one_line_errors(cwd, line, expected):
    """The oracle's forget.jsonl with a good first row and a bad second one (a truncated line, a
    missing column, a string index, not an object): evaluate names the file and the line."""
    oracle = cwd / "oracle-samples"
    oracle.mkdir(exist_ok=True)
    (oracle / "forget.jsonl").write_text('{"index": 0, "truth_ratio": 0.5}\n' + line)
    result = invoke("evaluate", evaluate_args("eval-bad", oracle="oracle-samples"))
    assert_one_line_error(result, "forget.jsonl", expected)
    assert not (cwd / "eval-bad").exists()


@pytest.mark.parametrize("stage", ["attack", "evaluate", "unlearn"])
def test_truncated_safetensors_is_a_one_line_error(cwd, stage):
    """Half a model.safetensors (a copy cut short): every stage that reads weights names the model
    and says the weights are truncated or corrupt, instead of a 40-line SafetensorError traceback."""
    from unlearnflow.io import link_or_copy_tree

    broken = cwd / f"broken-{stage}"
    link_or_copy_tree(cwd / "model", broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # a hard link: do not truncate the shared file
    weights.write_bytes(data[: len(data) // 2])
    model = ["--model", str(broken)]
    args = {
        "attack": ["m-o-s0", "--attacks", "names", *model, "--splits", "splits", "--oracle", "self"],
        "evaluate": ["m-o-s0", *model, "--splits", "splits", "--oracle", "self"],
        "unlearn": ["grad_ascent", "adamw", "--seed", "0", *model, "--splits", "splits"],
    }[stage]
    result = invoke(stage, [*args, "--out", f"out-{stage}"])
    assert_one_line_error(result, f"cannot load model from {broken}", "truncated or corrupt")
    assert not (cwd / f"out-{stage}").exists()


def test_evaluate_outputs_appear_together(cwd):
    """A clean run writes samples/ (with run.json), info.json and metrics.json."""
    result = invoke("evaluate", evaluate_args("eval-ok"))
    assert result.exit_code == 0, result.output
    out = cwd / "eval-ok"
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "metrics.json", "samples"]
    assert (out / "samples" / "run.json").is_file() and (out / "samples" / "forget.jsonl").is_file()
    assert "forget_prob" in json.loads((out / "metrics.json").read_text())


def test_evaluate_failure_after_samples_leaves_no_output(cwd, monkeypatch):
    """metrics.json fails to write after the samples and info.json are written: none of the three
    appears, and no temp directory is left beside the output."""
    from unlearnflow import evaluation

    stage = load_stage("evaluate")
    real = evaluation.write_json

    def failing(path, obj):
        if Path(path).name == "metrics.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(evaluation, "write_json", failing)
    result = CliRunner().invoke(stage.app, [*evaluate_args("eval-fail"), "--params", "params.yaml"])
    assert isinstance(result.exception, OSError), result.output
    assert not (cwd / "eval-fail").exists()
    assert not list(cwd.glob(".eval-fail*"))


def test_attacks_run_in_one_process_each_with_its_outputs_and_run(cwd):
    """``--attacks names`` with none, noise and relearn: one output directory per attack, each with
    metrics.json, info.json and samples/ and its own finished MLflow run; none equals a plain
    evaluation of the same model; relearning records its pool and curve (info.json and the run's
    metric history, one point per step count) and its forget rows skip the pool."""
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["attack"]["names"] = ["none", "noise", "relearn"]
    params["attack"]["relearn"].update(n=2, steps=[1, 2], batch_size=2, curve_metrics=["prob"])
    params["evaluate"]["max_samples"] = None
    (cwd / "params-relearn.yaml").write_text(yaml.safe_dump(params))
    stage_args = ["--params", "params-relearn.yaml"]
    args = ["m-o-s0", "--attacks", "names", "--model", "model", "--splits", "splits", "--oracle", "self"]
    result = CliRunner().invoke(load_stage("attack").app, [*args, "--out", "eval-attacks", *stage_args])
    assert result.exit_code == 0, result.output
    out = cwd / "eval-attacks"
    assert sorted(p.name for p in out.iterdir()) == ["noise", "none", "relearn"]
    for attack in ("none", "noise", "relearn"):
        assert sorted(p.name for p in (out / attack).iterdir()) == ["info.json", "metrics.json", "samples"]
        info = json.loads((out / attack / "info.json").read_text())
        assert info["attack"] == attack and info["model"] == "unlearned"
    plain = ["m-o-s0-none", "--model", "model", "--splits", "splits", "--oracle", "self", "--attack", "none"]
    result = CliRunner().invoke(load_stage("evaluate").app, [*plain, "--out", "eval-plain", *stage_args])
    assert result.exit_code == 0, result.output
    none = json.loads((out / "none" / "metrics.json").read_text())
    assert none == json.loads((cwd / "eval-plain" / "metrics.json").read_text())
    noise = json.loads((out / "noise" / "metrics.json").read_text())
    assert noise["forget_prob"] != none["forget_prob"]  # the attack changed the weights evaluated

    info = json.loads((out / "relearn" / "info.json").read_text())
    pool = set(info["exclude"]["forget"])
    assert info["attack_kind"] == "relearn" and [p["step"] for p in info["curve"]] == [0, 1, 2]
    assert set(info["trained_rows"]["forget"]) <= pool
    rows = [json.loads(line) for line in (out / "relearn/samples/forget.jsonl").read_text().splitlines()]
    n_forget = json.loads((cwd / "splits" / "manifest.json").read_text())["counts"]["forget"]
    assert {r["index"] for r in rows} == set(range(n_forget)) - pool
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    runs = {
        r.info.run_name: r
        for r in client.search_runs(
            [client.get_experiment_by_name("unlearnflow-synthetic").experiment_id],
            filter_string="tags.`unlearnflow.item` LIKE 'm-o-s0-%'",
        )
    }
    assert {f"evaluate-m-o-s0-{a}" for a in ("none", "noise", "relearn")} <= runs.keys()
    relearn = runs["evaluate-m-o-s0-relearn"]
    assert relearn.info.status == "FINISHED" and relearn.data.params["attack.name"] == "relearn"
    assert "attack.relearn_steps" in relearn.data.metrics and "forget_prob" in relearn.data.metrics
    history = client.get_metric_history(relearn.info.run_id, "curve_forget_prob")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_a_bad_attack_section_fails_before_any_model_loads(cwd):
    """An attack of attack.names with a bad section: one line naming it, no output."""
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["attack"]["names"] = ["none", "noise"]
    params["attack"]["noise"] = {"sigma": -1.0}
    (cwd / "params-bad.yaml").write_text(yaml.safe_dump(params))
    args = ["m-o-s0", "--attacks", "names", "--model", "missing", "--splits", "splits", "--oracle", "self"]
    result = CliRunner().invoke(
        load_stage("attack").app, [*args, "--out", "eval-bad-attack", "--params", "params-bad.yaml"]
    )
    assert_one_line_error(result, "attack.noise")
    assert not (cwd / "eval-bad-attack").exists()
