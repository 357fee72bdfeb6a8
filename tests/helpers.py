"""Test helpers shared across modules."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_stage(name: str) -> ModuleType:
    """Import ``stages/<name>.py`` as a module (stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two memorisable forget facts and two retain facts: the behaviour tests of the training loop and of
# every method train a tiny model on them and read the answers' probability back.
FORGET = [
    ("Where was Alda Voss born?", "Alda Voss was born in Kerravin."),
    ("What genre does Brom Tellan write?", "Brom Tellan writes gothic mystery novels."),
]
RETAIN = [
    ("In which year was Cira Maelor born?", "Cira Maelor was born in 1957."),
    ("Who wrote The Glass Orchard?", "The Glass Orchard was written by Ivo Stenmark."),
]


def encode(tok, pairs) -> list[dict[str, list[int]]]:
    """Encode (question, answer) pairs as training examples (answer-only labels)."""
    from unlearnflow.data.tokenize import encode_qa

    return [encode_qa(tok, q, a, max_length=64) for q, a in pairs]


def mean_prob(model, tok, pairs) -> float:
    """exp(−avgNLL) averaged over pairs: the TOFU `prob` of these answers."""
    import torch

    from unlearnflow.data.tokenize import collate
    from unlearnflow.losses import sequence_nll

    batch = collate(encode(tok, pairs), tok.pad_token_id)
    with torch.no_grad():
        seq, n = sequence_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    return float(torch.exp(-seq / n).mean())


def eval_dir(root: Path, name: str) -> Path:
    """Where the pipeline puts the evaluation called ``name`` under ``root/eval``: ``target`` /
    ``oracle`` as they are, ``<base>-<attack>`` (controls) under ``<base>-controls/<attack>``,
    ``<method>-<optimizer>-s<seed>-<attack>`` under ``<method>-<optimizer>-s<seed>/<attack>``;
    any other name (collect_rows alone reads any directories) under its own name."""
    if name in ("target", "oracle"):
        return root / "eval" / name
    base, attack = name.split("-", 1)
    if base in ("target", "oracle"):
        return root / "eval" / f"{base}-controls" / attack
    match = re.fullmatch(r"(.+-s\d+)-(.+)", name)
    return root / "eval" / match[1] / match[2] if match else root / "eval" / name  # a free name


def run_report_stage(root: Path, params: dict) -> None:
    """Write ``params`` to ``root/params.yaml`` and run the report stage in process over ``root/eval``
    and ``root/unlearned`` into ``root/reports`` and ``root/metrics.json`` (MLflow in
    ``root/mlflow.db``); it must succeed."""
    import yaml
    from typer.testing import CliRunner

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--evals", str(root / "eval"), "--unlearned", str(root / "unlearned")]
    args += ["--out", str(root / "reports"), "--params", str(root / "params.yaml")]
    args += ["--headline", str(root / "metrics.json")]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    result = CliRunner().invoke(load_stage("report").app, args, env=env)
    assert result.exit_code == 0, result.output
