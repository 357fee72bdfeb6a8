"""Stage `evaluate`: the benchmark's metric suite on one model (target, oracle or attacked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.config import ComputeConfig, EvaluateConfig, ModelConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import atomic_dir, read_jsonl, write_json, write_jsonl
from unlearnflow.metrics import evaluate_splits, summary_metrics

app = cli.stage_app(__doc__)
EVAL_SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY = ("retain", "real_authors", "world_facts")


def oracle_truth_ratios(reference: str) -> np.ndarray | None:
    """The oracle's per-sample forget truth ratios from its evaluate output (None for the oracle itself)."""
    if reference == "self":
        return None
    path = Path(reference) / "forget.jsonl"
    if not path.exists():
        raise UnlearnflowError(f"oracle per-sample file not found: {path} (evaluate the oracle first)")
    return np.array([row["truth_ratio"] for row in read_jsonl(path)], dtype=float)


@app.command()
def main(
    name: str = typer.Argument(..., help="item name: target, oracle or <method>-<optimizer>-<attack>"),
    model: Path = typer.Option(..., help="model directory to evaluate"),
    splits: Path = typer.Option(..., help="directory written by `prepare`"),
    oracle: str = typer.Option(..., help="the oracle's per-sample directory, or 'self' for the oracle"),
    out: Path = typer.Option(..., help="output directory: metrics.json, info.json, samples/"),
    method: str = typer.Option(None, help="method of an unlearned model"),
    optimizer: str = typer.Option(None, help="optimizer of an unlearned model"),
    attack: str = typer.Option(None, help="attack applied to an unlearned model"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Evaluate MODEL on the forget, retain and utility splits; forget quality is measured against the oracle."""
    with cli.user_errors():
        cfg = load_section(params, "evaluate", EvaluateConfig)
        model_cfg = load_section(params, "model", ModelConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        kind = name if name in ("target", "oracle") else "unlearned"
        info = {"model": kind, "method": method, "optimizer": optimizer, "attack": attack}
        upstream = [model / "run.json", splits / "run.json"]
        with tracking.stage_run(
            "evaluate",
            name,
            experiment=cli.experiment_name(params),
            params={"evaluate": cfg.model_dump()},
            upstream=upstream,
        ) as run:
            run.set_tags({k: str(v) for k, v in info.items() if v is not None})
            reference = oracle_truth_ratios(oracle)
            tok = modeling.load_tokenizer(model, trust_remote_code=model_cfg.trust_remote_code)
            net = modeling.load_model(model, device=device, trust_remote_code=model_cfg.trust_remote_code)
            data = split_io.read_splits(splits, EVAL_SPLITS)
            result = evaluate_splits(
                net,
                tok,
                data,
                metrics=cfg.metrics,
                batch_size=cfg.batch_size,
                max_new_tokens=cfg.max_new_tokens,
                max_length=model_cfg.max_length,
                device=device,
                max_samples=cfg.max_samples,
                seed=cfg.seed,
            )
            forget_tr = result.forget_truth_ratios
            metrics = {
                **result.aggregates,
                **summary_metrics(
                    result.aggregates, forget_tr, forget_tr if reference is None else reference, UTILITY
                ),
            }
            with atomic_dir(out / "samples") as tmp:
                for split, rows in result.per_sample.items():
                    write_jsonl(tmp / f"{split}.jsonl", rows)
                run.write_manifest(tmp / "run.json")
            write_json(out / "info.json", info)
            write_json(out / "metrics.json", metrics)
            run.log_metrics(metrics)
            for split in result.per_sample:
                run.log_artifact(out / "samples" / f"{split}.jsonl", "samples")


if __name__ == "__main__":
    app()
