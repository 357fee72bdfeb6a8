"""Stage `attack`: every attack of a list on one model, each evaluated, in one process.

The model is an unlearned checkpoint (``attack.names``, item ``<method>-<optimizer>-s<seed>``) or,
as a control, the target or the oracle (``attack.controls``). Each attack is applied in memory to a
fresh load of the model and the attacked model is evaluated at once into ``--out/<attack>/``
(metrics.json, info.json with the attack's statistics and what it excluded, samples/), with its own
MLflow run ``evaluate-<item>-<attack>`` (relearning's recovery curve as a metric history): one
process and no checkpoint copy per attack, where a process and a saved checkpoint per attack made
the attacks cost more than the evaluations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from unlearnflow import cli
from unlearnflow.config import AttackConfig, load_section
from unlearnflow.errors import UnlearnflowError
from unlearnflow.evaluation import Evaluation, model_info
from unlearnflow.io import atomic_dir

if TYPE_CHECKING:
    from unlearnflow.attacks import Attack
    from unlearnflow.tracking import StageRun

app = cli.stage_app(__doc__)
LISTS = ("names", "controls")


def attack_list(params: Path, which: str) -> dict[str, Attack]:
    """The attacks of ``attack.<which>`` (names | controls) by name, each built from its section:
    every section is checked here, before any model loads."""
    from unlearnflow.attacks import build_attack

    if which not in LISTS:
        raise UnlearnflowError(f"--attacks must be one of {', '.join(LISTS)}, got {which!r}")
    cfg = load_section(params, "attack", AttackConfig)
    return {a: build_attack(a, cfg) for a in getattr(cfg, which)}


def applying(atk: Attack, splits: Path, params: Path, device: Any):
    """The ``Evaluation.run`` change that applies ``atk`` to the loaded model and logs what it did."""
    from unlearnflow.attacks import AttackContext

    def change(net: Any, tok: Any, run: StageRun) -> tuple[dict[str, Any], dict[str, frozenset[int]]]:
        ctx = AttackContext(tokenizer=tok, splits=splits, params=params, device=device)
        stats = atk.apply(net, ctx) if atk.modifies_weights else {}
        net.zero_grad(set_to_none=True)  # a relearning attack leaves its last gradients behind
        run.log_metrics({f"attack.{k}": v for k, v in stats.items()})
        for point in ctx.extras.get("curve", []):  # relearning's recovery curve, step by step
            run.log_metrics({f"curve_{k}": v for k, v in point.items() if k != "step"}, step=point["step"])
        # A relearning attack's pool: rows it (may have) trained on, never evaluated.
        exclude = {s: frozenset(rows) for s, rows in ctx.extras.get("exclude", {}).items()}
        return {"attack_kind": atk.args.kind, "attack_stats": stats, **ctx.extras}, exclude

    return change


@app.command()
def main(
    item: str = typer.Argument(
        ..., help="the attacked model's item: <method>-<optimizer>-s<seed>, target or oracle"
    ),
    attacks: str = typer.Option(..., help="names | controls: the attack.* list to run"),
    model: Path = typer.Option(..., help="model directory to attack"),
    splits: Path = typer.Option(..., help="directory written by `prepare` (relearning trains on its rows)"),
    oracle: str = typer.Option(..., help="the oracle's per-sample directory, or 'self' for the oracle"),
    out: Path = typer.Option(..., help="output directory: one <attack>/ evaluation per attack"),
    method: str = typer.Option(None, help="method of an unlearned model"),
    optimizer: str = typer.Option(None, help="optimizer of an unlearned model"),
    seed: int = typer.Option(None, help="unlearn seed of an unlearned model"),
    role: str = typer.Option(None, help="target | oracle | unlearned (default: from the item)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Apply each attack of attack.ATTACKS to MODEL in turn and evaluate the attacked model."""
    with cli.user_errors():
        built = attack_list(params, attacks)
        evaluation = Evaluation.from_params(model, splits, oracle, params)
        info = model_info(item, role, model, method=method, optimizer=optimizer, seed=seed)
        # Every attack's output appears together with the others or not at all (one rename).
        with atomic_dir(out) as tmp:
            for name, atk in built.items():
                evaluation.run(
                    f"{item}-{name}",
                    {**info, "attack": name},
                    tmp / name,
                    change=applying(atk, splits, params, evaluation.device),
                    logged_params={"attack": {"name": name, **atk.args.model_dump()}},
                )


if __name__ == "__main__":
    app()
