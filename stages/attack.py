"""Stage `attack`: apply one attack (none, noise, quantize, relearn) to one model.

The model is an unlearned checkpoint (item ``<method>-<optimizer>-s<seed>``) or, as a control, the
target or the oracle. Beside the attacked checkpoint goes ``attack.json``: the attack's section,
its statistics, what ``evaluate`` must know (rows a relearning attack trained on, its recovery
curve) and the unlearning's weight change from the target (copied from the unlearned item).
"""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.attacks import AttackContext, build_attack
from unlearnflow.config import AttackConfig, ComputeConfig, ModelConfig, load_section
from unlearnflow.io import atomic_dir, link_or_copy_tree, read_json, write_json

app = cli.stage_app(__doc__)
ATTACK_FILE = "attack.json"
WEIGHT_CHANGE_FILE = "weight_change.json"


@app.command()
def main(
    item: str = typer.Argument(
        ..., help="the attacked model's item: <method>-<optimizer>-s<seed>, target or oracle"
    ),
    attack: str = typer.Argument(..., help="attack name (an attack.names or attack.controls item)"),
    model: Path = typer.Option(..., help="model directory to attack"),
    splits: Path = typer.Option(..., help="directory written by `prepare` (relearning trains on its rows)"),
    out: Path = typer.Option(..., help="attacked model directory to write"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Attack MODEL and save the attacked model with attack.json."""
    with cli.user_errors():
        cfg = load_section(params, "attack", AttackConfig)
        model_cfg = load_section(params, "model", ModelConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        atk = build_attack(attack, cfg)  # section checked: fails before any model loads
        section = atk.args.model_dump()
        run_ctx = tracking.stage_run(
            "attack",
            f"{item}-{attack}",
            experiment=cli.experiment_name(params),
            params={"attack": {"name": attack, **section}},
            upstream=[model / "run.json"],
        )
        with run_ctx as run, atomic_dir(out) as tmp:
            ctx = AttackContext(splits=splits, params=params, device=device)
            if atk.modifies_weights:
                tok = modeling.load_tokenizer(model, trust_remote_code=model_cfg.trust_remote_code)
                net = modeling.load_model(model, device=device, trust_remote_code=model_cfg.trust_remote_code)
                ctx.tokenizer = tok
                stats = atk.apply(net, ctx)
                modeling.save_pretrained(net, tok, tmp)
            else:
                stats = {}
                link_or_copy_tree(model, tmp)
                for stale in ("run.json", "steps.jsonl", "health.json", ATTACK_FILE):
                    (tmp / stale).unlink(missing_ok=True)  # the upstream run's, not this attack's
            run.log_metrics(stats)
            for point in ctx.extras.get("curve", []):  # relearning's recovery curve, step by step
                run.log_metrics(
                    {f"curve_{k}": v for k, v in point.items() if k != "step"}, step=point["step"]
                )
            record = {"name": attack, "section": section, "stats": stats, **ctx.extras}
            if (model / WEIGHT_CHANGE_FILE).is_file():
                record["weight_change"] = read_json(model / WEIGHT_CHANGE_FILE)
            write_json(tmp / ATTACK_FILE, record)
            run.write_manifest(tmp / "run.json")


if __name__ == "__main__":
    app()
