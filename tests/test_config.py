"""Typed params: unknown keys and bad values are one-line errors, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import ROOT, load_stage
from typer.testing import CliRunner

from unlearnflow.config import (
    AttackConfig,
    BenchmarkConfig,
    EvaluateConfig,
    UnlearnConfig,
    declared_keys,
    load_section,
    parse_section,
    validate_params,
)
from unlearnflow.errors import ConfigError


def test_default_params_file_validates():
    for section, cls in (
        ("benchmark", BenchmarkConfig),
        ("unlearn", UnlearnConfig),
        ("attack", AttackConfig),
    ):
        load_section(ROOT / "params.yaml", section, cls)


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_section({"lrr": 1e-4}, "unlearn", UnlearnConfig)
    msg = str(err.value)
    assert "unlearn.lrr" in msg and "lr" in msg and "\n" not in msg


def test_nested_unknown_key():
    with pytest.raises(ConfigError, match=r"benchmark\.synthetic\.n_autors.*n_authors"):
        parse_section({"synthetic": {"n_autors": 3}}, "benchmark", BenchmarkConfig)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"lr": "fast"}, "unlearn.lr"),
        ({"lr": -1.0}, "unlearn.lr"),
        ({"schedule": "exponential"}, "unlearn.schedule"),
        ({"batch_size": 0}, "unlearn.batch_size"),
    ],
)
def test_bad_value_names_key_value_and_rule(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_section(raw, "unlearn", UnlearnConfig)
    msg = str(err.value)
    value = next(iter(raw.values()))
    assert key in msg and repr(value) in msg and "\n" not in msg


def test_bad_split_name():
    with pytest.raises(ConfigError, match=r"benchmark\.split"):
        parse_section({"split": "forget_ten"}, "benchmark", BenchmarkConfig)


def test_declared_keys_walks_nested_sections():
    keys = declared_keys(BenchmarkConfig, "benchmark")
    assert {"benchmark.name", "benchmark.synthetic.n_authors"} <= keys


@pytest.mark.parametrize(
    ("section", "override", "expected"),
    [
        ("unlearn", {"lrr": 0.1}, "unknown key unlearn.lrr"),
        ("unlearn", {"epochs": "many"}, "bad value for unlearn.epochs: 'many'"),
        ("unlearn", {"method_args": {"grad_diff": {"alpha": "x"}}}, "unlearn.method_args.grad_diff.alpha"),
        (
            "unlearn",
            {"optimizer_args": {"adamw": {"bettas": [0.9, 0.99]}}},
            "unlearn.optimizer_args.adamw.bettas",
        ),
    ],
)
def test_stage_cli_exits_2_with_one_line(tmp_path, section, override, expected):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in override.items():
        if isinstance(value, dict):
            for sub, val in value.items():
                params[section][key][sub] = val
        else:
            params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    unlearn = load_stage("unlearn")
    result = CliRunner().invoke(
        unlearn.app,
        [
            "grad_diff",
            "adamw",
            "--model",
            str(tmp_path / "m"),
            "--splits",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(path),
        ],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_method_lists_known_ones(tmp_path):
    unlearn = load_stage("unlearn")
    result = CliRunner().invoke(
        unlearn.app,
        [
            "no_such_method",
            "adamw",
            "--model",
            "m",
            "--splits",
            "s",
            "--out",
            str(tmp_path / "o"),
            "--params",
            str(ROOT / "params.yaml"),
        ],
    )
    assert result.exit_code == 2
    assert "unknown unlearning method 'no_such_method'; known:" in result.output
    known = _known_names(result.output.strip())
    assert "grad_ascent" in known and "sft" not in known


def test_finetune_adopts_a_ready_checkpoint_without_training(
    tmp_path, monkeypatch, tiny_model, tiny_tokenizer
):
    from unlearnflow.modeling import save_pretrained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ready = tmp_path / "published-target"
    save_pretrained(tiny_model, tiny_tokenizer, ready)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["target"] = str(ready)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    finetune = load_stage("finetune")
    args = [
        "target",
        "--splits",
        str(tmp_path / "no-splits"),
        "--out",
        str(tmp_path / "models/target"),
        "--params",
        "params.yaml",
    ]
    result = CliRunner().invoke(finetune.app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "models/target"
    assert (out / "model.safetensors").read_bytes() == (ready / "model.safetensors").read_bytes()
    assert (out / "run.json").exists() and not (out / "steps.jsonl").exists()

    (ready / "model.safetensors").unlink()
    result = CliRunner().invoke(finetune.app, args)
    assert result.exit_code == 2 and "no *.safetensors weights" in result.output


def _params_with(tmp_path, edit) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["unlearn"].update(lr_typo=1), "unknown key unlearn.lr_typo; allowed keys here: "),
        (lambda p: p.update(unleanr={"lr": 1}), "unknown section unleanr; allowed sections here: attack, "),
        (lambda p: p["finetune"].update(lr=-1), "bad value for finetune.lr: -1"),
        (lambda p: p["attack"]["noise"].update(sigmaa=1), "unknown key attack.noise.sigmaa"),
        (lambda p: p.update(compute=3), "bad value for compute: 3"),
    ],
)
def test_every_section_load_validates_the_whole_file(tmp_path, edit, expected):
    """A typo in a section the caller does not read still fails its load (evaluate loading
    ``evaluate`` fails on ``unlearn.lr_typo``), so no stage runs on a file with a typo in it."""
    path = _params_with(tmp_path, edit)
    with pytest.raises(ConfigError) as err:
        load_section(path, "evaluate", EvaluateConfig)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_whole_file_check_accepts_valid_files(tmp_path):
    """An empty section (``tracking:``), a missing one, and the free-form per-name args of the
    matrix (``unlearn.method_args.<name>``, also for a method not listed) are all valid here (the registries check names: ``matrix``)."""

    def edit(p):
        p["tracking"] = None
        del p["compute"]
        p["unlearn"]["method_args"]["some_method"] = {"beta": 0.1}

    path = _params_with(tmp_path, edit)
    assert load_section(path, "evaluate", EvaluateConfig) == EvaluateConfig.model_validate(
        yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]
    )
    assert set(validate_params(path)) == set(yaml.safe_load(path.read_text()))


def test_check_params_stage(tmp_path):
    """Valid params write a marker whose bytes do not depend on the values (so prepare, which
    depends on it, does not rerun on a valid edit); a typo exits 2 with one line and removes it."""
    stage = load_stage("check_params")
    out = tmp_path / "checked.json"

    def run(edit):
        return CliRunner().invoke(
            stage.app, ["--out", str(out), "--params", str(_params_with(tmp_path, edit))]
        )

    assert run(lambda p: None).exit_code == 0
    first = out.read_bytes()
    assert run(lambda p: p["unlearn"].update(lr=0.5)).exit_code == 0
    assert out.read_bytes() == first
    result = run(lambda p: p["unlearn"].update(lr_typo=1))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: unknown key unlearn.lr_typo")
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda p: p["unlearn"]["method_args"].update(grad_acent={"gamma": 1.0}),
            "error: unknown name 'grad_acent' in unlearn.method_args; known: ceu, grad_ascent, grad_diff, idk_dpo, idk_nll, npo, ofmu, pdu, rmu, satimp, simnpo, undial, wga",
        ),
        (
            lambda p: p["unlearn"]["optimizer_args"]["sgd"].update(momentun=0.9),
            "error: unknown key unlearn.optimizer_args.sgd.momentun",
        ),
        (
            lambda p: p["unlearn"].update(pairs=[{"method": "sft", "optimizer": "adamw"}]),
            "error: unknown name 'sft' in unlearn.pairs[].method",
        ),
        (
            lambda p: p["unlearn"]["method_args"]["grad_diff"].update(retain_loss="l2"),
            "error: bad value for unlearn.method_args.grad_diff.retain_loss: 'l2'",
        ),
    ],
)
def test_check_params_stage_checks_the_matrix_args(tmp_path, edit, expected):
    """The per-name args sections are free-form in ``UnlearnConfig`` (each method validates its
    own), so the stage checks them against the registries: a misspelt name, even one no item lists
    (``optimizer_args.sgd`` while only adamw runs), or a misspelt key inside fails in one line."""
    stage = load_stage("check_params")
    out = tmp_path / "checked.json"
    params = _params_with(tmp_path, edit)
    result = CliRunner().invoke(stage.app, ["--out", str(out), "--params", str(params)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(expected), lines[0]
    assert not out.exists()


def test_item_config_overrides_lr_and_epochs_optimizer_over_method_over_unlearn():
    """unlearn.lr 3e-4 / epochs 5; grad_diff sets lr 1e-4; sgd sets lr 0.05 and epochs 2:
    adamw × grad_diff → lr from the method, epochs from unlearn; sgd × grad_diff → both from sgd;
    sgd × grad_ascent (no method override) → sgd's too; adamw × grad_ascent → unlearn's."""
    from unlearnflow.matrix import item_config

    cfg = parse_section(
        {
            "lr": 3e-4,
            "epochs": 5,
            "method_args": {"grad_diff": {"lr": 1e-4}},
            "optimizer_args": {"sgd": {"lr": 0.05, "epochs": 2}},
        },
        "unlearn",
        UnlearnConfig,
    )
    cases = {
        ("grad_diff", "adamw"): (1e-4, 5, "unlearn.method_args.grad_diff.lr", "unlearn.epochs"),
        ("grad_diff", "sgd"): (0.05, 2, "unlearn.optimizer_args.sgd.lr", "unlearn.optimizer_args.sgd.epochs"),
        ("grad_ascent", "sgd"): (
            0.05,
            2,
            "unlearn.optimizer_args.sgd.lr",
            "unlearn.optimizer_args.sgd.epochs",
        ),
        ("grad_ascent", "adamw"): (3e-4, 5, "unlearn.lr", "unlearn.epochs"),
    }
    for (method, optimizer), (lr, epochs, lr_key, ep_key) in cases.items():
        item, source = item_config(cfg, method, optimizer)
        assert (item.lr, item.epochs) == (lr, epochs), (method, optimizer)
        assert source == {"lr": lr_key, "epochs": ep_key}
    with pytest.raises(ConfigError, match=r"unlearn\.method_args\.grad_diff\.lr"):
        item_config(
            parse_section({"method_args": {"grad_diff": {"lr": -1}}}, "unlearn", UnlearnConfig),
            "grad_diff",
            "adamw",
        )


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_saved_model_files_get_ordinary_permissions(tmp_path, tiny_model, tiny_tokenizer, umask, mode):
    """Every file ``save_pretrained`` writes is 0o666 & ~umask, as ``open`` makes it: safetensors
    alone writes ``model.safetensors`` 0600, unreadable to another user or a serving process."""
    import os

    from unlearnflow.modeling import save_pretrained

    old = os.umask(umask)
    try:
        save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "model")
    finally:
        os.umask(old)
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(mode)}, modes


def _known_names(message: str) -> list[str]:
    return message.rpartition("known: ")[2].split(", ")


def test_unknown_unlearning_method_lists_unlearning_methods_only():
    """The unknown-name error of each place that takes an unlearning method (the unlearn stage's
    item_config, the pairs product) lists the unlearning methods, without finetune's ``sft``."""
    from unlearnflow.matrix import item_config, product_pairs, unlearning_methods

    with pytest.raises(ConfigError) as err:
        item_config(UnlearnConfig(), "grad_acent", "adamw")
    assert "'grad_acent'" in str(err.value) and _known_names(str(err.value)) == unlearning_methods()
    assert "grad_diff" in unlearning_methods() and "sft" not in unlearning_methods()
    with pytest.raises(ConfigError) as err:
        product_pairs(["sft"], ["adamw"])
    assert "not an unlearning method" in str(err.value) and "sft" not in _known_names(str(err.value))


def test_unlearn_stage_refuses_sft_in_one_line(tmp_path, monkeypatch):
    """``sft`` is registered (finetune and the relearn attack train with it) but is no unlearning
    method: the unlearn stage run by hand refuses it before loading anything, in one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    args = ["--model", "nomodel", "--splits", "splits", "--out", "out", "--params", "params.yaml"]
    result = CliRunner().invoke(load_stage("unlearn").app, ["sft", "adamw", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(
        "error: unknown unlearning method 'sft' (a fine-tuning loss, not an unlearning"
    )
    assert "sft" not in _known_names(lines[0]) and not (tmp_path / "out").exists()


def _check_params_in(tmp_path, monkeypatch, benchmark: dict):
    """Run check_params in process from ``tmp_path`` (the project root) on params with ``benchmark``."""
    monkeypatch.chdir(tmp_path)
    params = _params_with(tmp_path, lambda p: p.update(benchmark={**p["benchmark"], **benchmark}))
    out = tmp_path / "checked.json"
    result = CliRunner().invoke(load_stage("check_params").app, ["--out", str(out), "--params", str(params)])
    return result, [line for line in result.output.splitlines() if line.strip()], out


@pytest.mark.parametrize(
    ("benchmark", "key", "value"),
    [
        (
            {
                "name": "custom",
                "custom": {"forget": "/srv/requests/forget.jsonl", "retain": "inputs/r.jsonl"},
            },
            "benchmark.custom.forget",
            "/srv/requests/forget.jsonl",
        ),
        (
            {"name": "custom", "custom": {"forget": "inputs/f.jsonl", "retain": "data/r.jsonl"}},
            "benchmark.custom.retain",
            "data/r.jsonl",
        ),
        (  # `..` is collapsed: this is beside inputs/, not in it
            {"name": "custom", "custom": {"forget": "inputs/../f.jsonl", "retain": "inputs/r.jsonl"}},
            "benchmark.custom.forget",
            "inputs/../f.jsonl",
        ),
        ({"name": "tofu", "source": "./tofu-copy"}, "benchmark.source", "./tofu-copy"),
        (
            {"name": "wmdp", "source": "cais/wmdp", "wmdp": {"forget_corpus": ["./corpora:bio-forget"]}},
            "benchmark.wmdp.forget_corpus[0]",
            "./corpora:bio-forget",
        ),
    ],
)
def test_check_params_refuses_local_inputs_outside_inputs_dir(tmp_path, monkeypatch, benchmark, key, value):
    """A local file the benchmark reads from outside inputs/ (prepare's DVC dep) is refused in one
    line naming the key, the value and where to put it: DVC would never see an edit to it."""
    result, lines, out = _check_params_in(tmp_path, monkeypatch, benchmark)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == (
        f"error: {key}={value!r} is outside inputs/, so DVC would not see edits to it: "
        "move it under inputs/ (docs/benchmarks.md)"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "benchmark",
    [
        {"name": "custom", "custom": {"forget": "inputs/f.jsonl", "retain": "inputs/sub/r.jsonl"}},
        {"name": "custom", "custom": {"forget": "./inputs/f.jsonl", "retain": "inputs/r.jsonl"}},
        {"name": "tofu", "source": "locuslab/TOFU"},  # a hub id is not a path
        {"name": "tofu", "source": "inputs/tofu"},
        # custom paths are unread by the synthetic benchmark
        {"name": "synthetic", "custom": {"forget": "/srv/f.jsonl", "retain": "/srv/r.jsonl"}},
    ],
)
def test_check_params_accepts_inputs_under_inputs_dir_and_hub_ids(tmp_path, monkeypatch, benchmark):
    result, _, out = _check_params_in(tmp_path, monkeypatch, benchmark)
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_check_params_accepts_an_absolute_path_into_inputs_dir(tmp_path, monkeypatch):
    custom = {"forget": str(tmp_path / "inputs" / "f.jsonl"), "retain": "inputs/r.jsonl"}
    result, _, out = _check_params_in(tmp_path, monkeypatch, {"name": "custom", "custom": custom})
    assert result.exit_code == 0, result.output
    assert out.exists()
