"""Stage `unlearn`: make the target forget the forget split with one method × optimizer pair."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.config import ComputeConfig, ModelConfig, TrackingConfig, UnlearnConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.data.refusals import idk_rows
from unlearnflow.data.tokenize import PromptFormat, training_examples
from unlearnflow.io import atomic_dir, write_json, write_jsonl
from unlearnflow.matrix import check_pair, item_config

app = cli.stage_app(__doc__)


@app.command()
def main(
    method: str = typer.Argument(..., help="method name (an unlearn.pairs entry's method)"),
    optimizer: str = typer.Argument(..., help="optimizer name (an unlearn.pairs entry's optimizer)"),
    model: Path = typer.Option(..., help="target model directory"),
    splits: Path = typer.Option(..., help="directory written by `prepare`"),
    out: Path = typer.Option(..., help="unlearned model directory to write"),
    seed: int = typer.Option(0, help="this item's seed (one of unlearn.seeds): torch seed and data order"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Unlearn MODEL on the forget split (retain split alongside) and save the result."""
    # The training loop, the methods and the weight comparison import torch: here, not above, so
    # that --help costs none.
    from unlearnflow import train
    from unlearnflow.methods import build_method
    from unlearnflow.weights import weight_change

    with cli.user_errors():
        # The seed comes from the matrix item, not from the seeds list (not a dep of each item).
        cfg, schedule_from = item_config(
            load_section(params, "unlearn", UnlearnConfig).with_seed(seed), method, optimizer
        )
        model_cfg = load_section(params, "model", ModelConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        max_mb = load_section(params, "tracking", TrackingConfig).artifact_max_mb
        algo = build_method(method, cfg.method_args.get(method))  # args checked: fails before loading
        check_pair(cfg, method, optimizer)  # e.g. ofmu × a zeroth-order optimizer: one line, no model loaded
        layout = split_io.read_layout(splits)
        # Each stream reads its split, only those the method trains on. "idk" is no split on disk but
        # the forget questions with refusal answers (data/refusals.py), built here, before anything
        # heavy is loaded, so that a forget split without questions fails first.
        sources = {s: layout.unlearn["forget" if s == "idk" else s] for s in algo.streams}
        data = split_io.read_splits(splits, list(dict.fromkeys(sources.values())))
        streams = {s: (data[name], layout.info[name].kind, name) for s, name in sources.items()}
        if "idk" in streams:
            forget, kind, name = streams["idk"]
            refusals = idk_rows(forget, kind, seed=cfg.seed, method=method, split=name)
            streams["idk"] = (refusals, "qa", f"{name} (refusals)")
        logged = {
            "unlearn": cfg.model_dump(exclude={"pairs", "seeds", "method_args", "optimizer_args"}),
            "method": {"name": method, **algo.args.model_dump()},
            "optimizer": {"name": optimizer, **cfg.optimizer_args.get(optimizer, {})},
            "schedule_from": schedule_from,  # which params key set this item's lr and epochs
        }
        item = cli.item_name(method, optimizer, seed)
        upstream = [model / "run.json", splits / "run.json"]
        with tracking.stage_run(
            "unlearn", item, experiment=cli.experiment_name(params), params=logged, upstream=upstream
        ) as run:
            tok = modeling.load_tokenizer(model, trust_remote_code=model_cfg.trust_remote_code)
            net = modeling.load_model(model, trust_remote_code=model_cfg.trust_remote_code)
            encoded = {
                stream: training_examples(
                    tok,
                    rows,
                    kind,
                    max_length=model_cfg.max_length,
                    fmt=PromptFormat(**model_cfg.prompt_kwargs()),
                    split=label,
                )
                for stream, (rows, kind, label) in streams.items()
            }
            for stream, name in sources.items():
                run.log_dataset(splits / f"{name}.jsonl", name=name, context=f"unlearn-{stream}")
            result = train.run(
                net,
                algo,
                optimizer,
                encoded,
                cfg,
                pad_token_id=tok.pad_token_id,
                device=device,
                optimizer_args=cfg.optimizer_args.get(optimizer),
                divergence_limit=cfg.divergence_limit,
                on_log=run.log_metrics,
                desc=f"unlearn {item}",
            )
            # The unlearning's size against a 4-bit step: in which regime a quantization attack can bite.
            change = weight_change(net, model)
            with atomic_dir(out) as tmp:
                modeling.save_pretrained(net, tok, tmp)
                write_json(tmp / "weight_change.json", change)
                write_jsonl(tmp / "steps.jsonl", result.rows)
                write_json(tmp / "health.json", {"flags": result.health})  # read by the report
                write_json(tmp / "method_state.json", result.method_state)  # e.g. PDU's λ, OFMU's ρ
                write_json(
                    tmp / "item.json", logged | {"steps": result.steps, "wall_time_s": result.wall_time}
                )
                run.write_manifest(tmp / "run.json")
            run.log_health(result.health)
            run.log_metrics({"wall_time_s": result.wall_time, "steps": float(result.steps)})
            run.log_metrics({f"weight_{k}": v for k, v in change.items()})
            if result.stopped_early:
                run.set_tags({"unlearn.stopped_early": result.stopped_early})
            run.log_checkpoint(out, max_mb)


if __name__ == "__main__":
    app()
