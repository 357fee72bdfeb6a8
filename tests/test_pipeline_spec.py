"""dvc.yaml declares, for each stage, the params keys its config reads and the code it imports (so DVC
re-runs on change)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from unlearnflow.attacks import ATTACKS
from unlearnflow.config import (
    AttackConfig,
    BenchmarkConfig,
    ComputeConfig,
    EvaluateConfig,
    FinetuneConfig,
    ModelConfig,
    UnlearnConfig,
    declared_keys,
    load_section,
    parse_section,
)
from unlearnflow.errors import ConfigError
from unlearnflow.methods import METHODS
from unlearnflow.optim import OPTIMIZERS

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def covered(key: str, declared: list[str]) -> bool:
    """A key is covered by itself or by any declared ancestor (``model`` covers ``model.max_length``)."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def stage_params(stage: str) -> list[str]:
    body = DVC[stage].get("do", DVC[stage])
    return [p for p in body["params"] if isinstance(p, str)]


# stage → (section, config class, fields the stage does not read from that section)
READS = {
    "prepare": [("benchmark", BenchmarkConfig, set())],
    "finetune": [
        ("model", ModelConfig, set()),
        ("finetune", FinetuneConfig, set()),
        ("compute", ComputeConfig, set()),
    ],
    "unlearn": [
        # The matrix lists only shape dvc.yaml; method/optimizer args are declared per item below.
        # The seed arrives on the command line from the matrix (test_seed_axis_*), not as a param.
        (
            "unlearn",
            UnlearnConfig,
            {"pairs", "seeds", "seed", "method_args", "optimizer_args"},
        ),
        ("model", ModelConfig, {"base", "target", "oracle", "scratch"}),
        ("compute", ComputeConfig, set()),
    ],
    "evaluate_base": [("evaluate", EvaluateConfig, set()), ("compute", ComputeConfig, set())],
    # attack and attack_control run the attacks of attack.names / attack.controls in process, each
    # evaluated; relearning's curve reads the evaluate settings too.
    **{
        stage: [
            ("evaluate", EvaluateConfig, set()),
            ("attack", AttackConfig, set()),
            ("model", ModelConfig, {"base", "target", "oracle", "scratch"}),
            ("compute", ComputeConfig, set()),
        ]
        for stage in ("attack", "attack_control")
    },
}


@pytest.mark.parametrize("stage", sorted(READS))
def test_declared_params_cover_every_field_read(stage):
    declared = stage_params(stage)
    for section, cls, unread in READS[stage]:
        for key in declared_keys(cls, section):
            if key.split(".")[1] in unread:
                continue
            assert covered(key, declared), f"{stage} reads {key} but dvc.yaml does not declare it"


SEEDED = ("unlearn", "attack")


@pytest.mark.parametrize("stage", SEEDED)
def test_seed_axis_is_a_matrix_item_on_the_command_line(stage):
    """Each seed of unlearn.seeds is one item: its seed reaches the script as --seed and names its
    directories ``-s<seed>``; the list itself is no params dep (a new seed must not rerun the others)."""
    body = DVC[stage]
    assert body["matrix"]["seed"] == "${unlearn.seeds}"
    assert "--seed ${item.seed}" in body["cmd"]
    outs = [o if isinstance(o, str) else next(iter(o)) for o in [*body["outs"], *body.get("metrics", [])]]
    assert outs and all("${item.pair.method}-${item.pair.optimizer}-s${item.seed}" in o for o in outs), outs
    assert not any(p.startswith("unlearn.seed") for p in stage_params(stage))


def test_report_reads_every_seed_and_the_health_files():
    assert "unlearn.seeds" in stage_params("report")
    assert "unlearned" in DVC["report"]["deps"] and "--unlearned unlearned" in DVC["report"]["cmd"]


def test_unlearn_seed_is_a_list_of_distinct_seeds():
    params = load_section(ROOT / "params.yaml", "unlearn", UnlearnConfig)
    assert len(params.seeds) >= 3  # results are mean ± spread over ≥ 3 seeds
    assert params.with_seed(7).seed == 7 and params.with_seed(7).seeds == params.seeds
    with pytest.raises(ConfigError, match=r"^unlearn\.seed is replaced by unlearn\.seeds"):
        parse_section({"seed": 1}, "unlearn", UnlearnConfig)
    with pytest.raises(ConfigError, match=r"unlearn\.seeds: \[0, 0\]: .*distinct"):
        parse_section({"seeds": [0, 0]}, "unlearn", UnlearnConfig)
    with pytest.raises(ConfigError, match=r"unlearn\.seeds"):
        parse_section({"seeds": []}, "unlearn", UnlearnConfig)


def test_matrix_items_declare_their_own_args():
    assert "unlearn.method_args.${item.pair.method}" in stage_params("unlearn")
    assert "unlearn.optimizer_args.${item.pair.optimizer}" in stage_params("unlearn")
    assert "attack" in stage_params("attack")  # every attack of attack.names runs in the item


def test_params_yaml_has_args_for_every_listed_name():
    unlearn = load_section(ROOT / "params.yaml", "unlearn", UnlearnConfig)
    attack = load_section(ROOT / "params.yaml", "attack", AttackConfig)
    for m in unlearn.methods:
        assert m in METHODS and m in unlearn.method_args
    for o in unlearn.optimizers:
        assert o in OPTIMIZERS and o in unlearn.optimizer_args
    for a in [*attack.names, *attack.controls]:
        assert attack.args(a).kind in ATTACKS and a in PARAMS["attack"]


def test_controls_attack_target_and_oracle_and_are_evaluated():
    """Every control attack runs on both base models, in one attack_control item per base."""
    assert DVC["attack_control"]["foreach"] == ["target", "oracle"]
    body = DVC["attack_control"]["do"]
    assert "--attacks controls" in body["cmd"] and "--role ${item}" in body["cmd"]
    assert "models/${item}" in body["deps"] and body["outs"] == ["eval/${item}-controls"]
    assert "--attacks names" in DVC["attack"]["cmd"]
    assert DVC["attack"]["outs"] == ["eval/${item.pair.method}-${item.pair.optimizer}-s${item.seed}"]
    assert "attack.controls" in stage_params("report")


def test_every_stage_lists_its_script():
    for name, stage in DVC.items():
        body = stage.get("do", stage)
        script = body["cmd"].split()[1]
        assert script in body["deps"], f"{name}: {script} not among deps"


SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (``a.b`` → src/a/b.py or src/a/b/__init__.py), else None."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    """The ``unlearnflow`` modules the source file ``path`` imports anywhere (function bodies too).

    ``package`` resolves relative imports. ``from a.b import c`` counts ``a.b.c`` when it is a module
    (else ``c`` is a name in ``a.b``); importing ``a.b.c`` runs ``a`` and ``a.b`` too, so parents count.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")
                mod = ".".join([*parts[: len(parts) - node.level + 1], *([mod] if mod else [])])
            names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "unlearnflow" and module_file(name):
                parts = name.split(".")
                found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found


def import_closure(script: Path) -> dict[str, Path]:
    """Every ``unlearnflow`` module the stage script loads, directly or through other modules."""
    todo, seen = sorted(imported_modules(script, "")), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = seen[name] = module_file(name)
        todo += imported_modules(path, name if path.name == "__init__.py" else name.rpartition(".")[0])
    return seen


def test_imported_modules_count_parents_relative_imports_and_modules_only(tmp_path):
    """``import unlearnflow.data.splits`` runs unlearnflow/__init__ and data/__init__ too; inside
    package ``unlearnflow.data``, ``from . import splits`` is unlearnflow.data.splits and ``from
    ..errors import DataError`` is unlearnflow.errors (DataError is a name, not a module)."""
    script = tmp_path / "s.py"
    script.write_text("import os\nimport unlearnflow.data.splits\n")
    assert imported_modules(script, "") == {"unlearnflow", "unlearnflow.data", "unlearnflow.data.splits"}
    script.write_text("from . import splits\nfrom ..errors import DataError\n")
    assert imported_modules(script, "unlearnflow.data") == {
        "unlearnflow",
        "unlearnflow.data",
        "unlearnflow.data.splits",
        "unlearnflow.errors",
    }


def test_import_closure_follows_imports_inside_functions(tmp_path):
    """A script importing ``unlearnflow.cli`` inside a function loads cli and what cli imports
    (config, errors), but not modules nothing imports (train)."""
    script = tmp_path / "s.py"
    script.write_text("def main():\n    from unlearnflow import cli\n")
    closure = import_closure(script)
    assert {"unlearnflow", "unlearnflow.cli", "unlearnflow.config", "unlearnflow.errors"} <= set(closure)
    assert "unlearnflow.train" not in closure


def stage_bodies() -> dict[str, dict]:
    return {name: stage.get("do", stage) for name, stage in DVC.items()}


@pytest.mark.parametrize("stage", sorted(DVC))
def test_declared_deps_cover_every_module_imported(stage):
    """A stage script's code (every unlearnflow module it imports, transitively) is among its deps,
    as a file or under a declared folder, so editing that code reruns the stage."""
    body = stage_bodies()[stage]
    deps = [d.rstrip("/") for d in body["deps"] if isinstance(d, str)]
    script = ROOT / body["cmd"].split()[1]
    missing = sorted(
        rel
        for rel in (path.relative_to(ROOT).as_posix() for path in import_closure(script).values())
        if not any(rel == d or rel.startswith(d + "/") for d in deps)
    )
    assert not missing, f"{stage} imports code it does not depend on in dvc.yaml: {', '.join(missing)}"


def test_check_params_tracks_the_whole_file_and_runs_before_prepare():
    """``params.yaml:`` with no keys makes DVC track every key (any edit reruns the check); its
    out is a dep of prepare, the first stage, so DVC runs the check before anything else."""
    check = DVC["check_params"]
    assert check["params"] == [{"params.yaml": None}]
    (marker,) = check["outs"]
    assert marker in DVC["prepare"]["deps"]


def test_params_yaml_survives_dvc_set_param(tmp_path):
    """``dvc exp run -S key=value`` rewrites params.yaml through ruamel's round trip (dvc 3.67
    ``utils/hydra.py::apply_overrides``, called by ``repo/experiments/queue/base.py::_update_params``):
    with no override the file comes back byte for byte (no ``null`` emptied, no list re-indented, no
    comment dropped), and overrides change only their own lines."""
    from dvc.utils.hydra import apply_overrides

    original = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    apply_overrides(path, [])
    assert path.read_text() == original
    apply_overrides(path, ["unlearn.lr=1.0e-4", "benchmark.source=inputs/tofu"])
    before, after = original.splitlines(), path.read_text().splitlines()
    assert len(after) == len(before)
    changed = [new.split("#")[0].strip() for old, new in zip(before, after, strict=True) if old != new]
    assert changed == ["source: inputs/tofu", "lr: 0.0001"]


def test_prepare_depends_on_the_inputs_folder():
    """prepare reads the user's files from inputs/ (check_params refuses them elsewhere), so the folder
    is its DVC dep, and it exists in every clone (its README is tracked), or `dvc repro` would fail."""
    from unlearnflow.config import INPUTS_DIR

    assert INPUTS_DIR in DVC["prepare"]["deps"]
    assert (ROOT / INPUTS_DIR / "README.md").is_file()
