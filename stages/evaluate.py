"""Stage `evaluate`: the benchmark's metric suite on one model (target, oracle or attacked)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.config import ComputeConfig, EvaluateConfig, ModelConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.data.tokenize import PromptFormat
from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import atomic_dir, read_jsonl, write_json, write_jsonl
from unlearnflow.metrics import SuiteOptions, evaluate_splits, relative_metrics
from unlearnflow.metrics.suite import check_metric_names

app = cli.stage_app(__doc__)


def oracle_rows(reference: str) -> dict[str, list[dict]] | None:
    """The oracle's per-sample rows from its evaluate output (None for the oracle itself)."""
    if reference == "self":
        return None
    folder = Path(reference)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UnlearnflowError(f"no oracle per-sample files in {folder} (evaluate the oracle first)")
    return {f.stem: read_jsonl(f) for f in files}


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
    """Evaluate MODEL with the benchmark's metric suite; forget quality, privleak and the reference
    attack are measured against the oracle."""
    with cli.user_errors():
        cfg = load_section(params, "evaluate", EvaluateConfig)
        check_metric_names(cfg.metrics)
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
            reference = oracle_rows(oracle)
            layout = split_io.read_layout(splits)
            tok = modeling.load_tokenizer(model, trust_remote_code=model_cfg.trust_remote_code)
            net = modeling.load_model(model, device=device, trust_remote_code=model_cfg.trust_remote_code)
            data = split_io.read_splits(splits, layout.evaluated())
            result = evaluate_splits(
                net,
                tok,
                data,
                layout,
                metrics=cfg.metrics,
                device=device,
                opts=SuiteOptions(
                    **cfg.suite_options(model_cfg.max_length),
                    prompt=PromptFormat(**model_cfg.prompt_kwargs()),
                ),
            )
            relative = relative_metrics(
                result, layout, result.per_sample if reference is None else reference, cfg.metrics
            )
            # An undefined number (no oracle, no such split) is left out, not written as NaN.
            metrics = {k: v for k, v in {**result.aggregates, **relative}.items() if not math.isnan(v)}
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
