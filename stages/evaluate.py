"""Stage `evaluate`: the benchmark's metric suite on one model as it is (target, oracle, or any
checkpoint). ``stages/attack.py`` evaluates a model under each attack of a list."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli
from unlearnflow.evaluation import Evaluation, model_info
from unlearnflow.io import atomic_dir

app = cli.stage_app(__doc__)


@app.command()
def main(
    name: str = typer.Argument(..., help="item name: target, oracle, or any name for the model"),
    model: Path = typer.Option(..., help="model directory to evaluate"),
    splits: Path = typer.Option(..., help="directory written by `prepare`"),
    oracle: str = typer.Option(..., help="the oracle's per-sample directory, or 'self' for the oracle"),
    out: Path = typer.Option(..., help="output directory: metrics.json, info.json, samples/"),
    method: str = typer.Option(None, help="method of an unlearned model"),
    optimizer: str = typer.Option(None, help="optimizer of an unlearned model"),
    attack: str = typer.Option(None, help="label: the attack MODEL went through, if any"),
    seed: int = typer.Option(None, help="unlearn seed of an unlearned model"),
    role: str = typer.Option(None, help="target | oracle | unlearned (default: from the name)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Evaluate MODEL with the benchmark's metric suite; forget quality, privleak and the reference
    attack are measured against the oracle."""
    with cli.user_errors():
        evaluation = Evaluation.from_params(model, splits, oracle, params)
        info = model_info(name, role, model, method=method, optimizer=optimizer, attack=attack, seed=seed)
        # samples/, info.json and metrics.json appear together or not at all: one temp dir, one rename.
        with atomic_dir(out) as tmp:
            evaluation.run(name, info, tmp)


if __name__ == "__main__":
    app()
