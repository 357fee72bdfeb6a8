"""dvc.yaml declares, for each stage, the params keys its config reads (so DVC re-runs on change)."""

from __future__ import annotations

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
)
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
        ("unlearn", UnlearnConfig, {"methods", "optimizers", "method_args", "optimizer_args"}),
        ("model", ModelConfig, {"base", "target", "oracle", "scratch"}),
        ("compute", ComputeConfig, set()),
    ],
    "evaluate": [("evaluate", EvaluateConfig, set()), ("compute", ComputeConfig, set())],
    "evaluate_base": [("evaluate", EvaluateConfig, set()), ("compute", ComputeConfig, set())],
}


@pytest.mark.parametrize("stage", sorted(READS))
def test_declared_params_cover_every_field_read(stage):
    declared = stage_params(stage)
    for section, cls, unread in READS[stage]:
        for key in declared_keys(cls, section):
            if key.split(".")[1] in unread:
                continue
            assert covered(key, declared), f"{stage} reads {key} but dvc.yaml does not declare it"


def test_matrix_items_declare_their_own_args():
    assert "unlearn.method_args.${item.method}" in stage_params("unlearn")
    assert "unlearn.optimizer_args.${item.optimizer}" in stage_params("unlearn")
    assert "attack.${item.attack}" in stage_params("attack")


def test_params_yaml_has_args_for_every_listed_name():
    unlearn = load_section(ROOT / "params.yaml", "unlearn", UnlearnConfig)
    attack = load_section(ROOT / "params.yaml", "attack", AttackConfig)
    for m in unlearn.methods:
        assert m in METHODS and m in unlearn.method_args
    for o in unlearn.optimizers:
        assert o in OPTIMIZERS and o in unlearn.optimizer_args
    for a in attack.names:
        assert a in ATTACKS and a in PARAMS["attack"]


def test_every_stage_lists_its_script():
    for name, stage in DVC.items():
        body = stage.get("do", stage)
        script = body["cmd"].split()[1]
        assert script in body["deps"], f"{name}: {script} not among deps"
