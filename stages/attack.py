"""Stage `attack`: apply one attack (none, noise, …) to one unlearned model."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.attacks import build_attack
from unlearnflow.config import AttackConfig, ComputeConfig, ModelConfig, load_section
from unlearnflow.io import atomic_dir, link_or_copy_tree

app = cli.stage_app(__doc__)


@app.command()
def main(
    method: str = typer.Argument(..., help="method of the unlearned model"),
    optimizer: str = typer.Argument(..., help="optimizer of the unlearned model"),
    attack: str = typer.Argument(..., help="attack name (attack.names)"),
    model: Path = typer.Option(..., help="unlearned model directory"),
    out: Path = typer.Option(..., help="attacked model directory to write"),
    seed: int = typer.Option(..., help="unlearn seed of the unlearned model (names the item)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Attack the unlearned MODEL and save the attacked model."""
    with cli.user_errors():
        cfg = load_section(params, "attack", AttackConfig)
        model_cfg = load_section(params, "model", ModelConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        atk = build_attack(attack, cfg)
        logged = {"attack": {"name": attack, **atk.args.model_dump()}}
        item = cli.item_name(method, optimizer, seed, attack)
        run_ctx = tracking.stage_run(
            "attack",
            item,
            experiment=cli.experiment_name(params),
            params=logged,
            upstream=[model / "run.json"],
        )
        with run_ctx as run, atomic_dir(out) as tmp:
            if atk.modifies_weights:
                tok = modeling.load_tokenizer(model, trust_remote_code=model_cfg.trust_remote_code)
                net = modeling.load_model(model, device=device, trust_remote_code=model_cfg.trust_remote_code)
                run.log_metrics(atk.apply(net))
                modeling.save_pretrained(net, tok, tmp)
            else:
                link_or_copy_tree(model, tmp)
                (tmp / "run.json").unlink(missing_ok=True)
                (tmp / "steps.jsonl").unlink(missing_ok=True)
                (tmp / "health.json").unlink(missing_ok=True)  # the unlearn run's, not the attack's
            run.write_manifest(tmp / "run.json")


if __name__ == "__main__":
    app()
