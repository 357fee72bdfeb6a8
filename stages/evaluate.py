"""Stage `evaluate`: the benchmark's metric suite on one model (target, oracle or attacked)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import typer

from unlearnflow import cli, modeling, tracking
from unlearnflow.config import ComputeConfig, EvaluateConfig, ModelConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.data.tokenize import PromptFormat
from unlearnflow.errors import DataError, UnlearnflowError
from unlearnflow.io import atomic_dir, read_json, read_jsonl, write_json, write_jsonl
from unlearnflow.metrics import SuiteOptions, evaluate_splits, facts, relative_metrics
from unlearnflow.metrics.relative import check_metrics

app = cli.stage_app(__doc__)
log = logging.getLogger("evaluate")
ATTACK_FILE = "attack.json"  # written by the attack stage beside the attacked checkpoint


def oracle_rows(reference: str) -> dict[str, list[dict]] | None:
    """The oracle's per-sample rows from its evaluate output (None for the oracle itself).

    Each file must be what evaluate writes: JSON objects with an integer ``index`` and the same
    columns on every row. A hand-edited or truncated file is a one-line ``DataError`` here, not a
    ``KeyError`` deep inside the relative metrics.
    """
    if reference == "self":
        return None
    folder = Path(reference)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UnlearnflowError(f"no oracle per-sample files in {folder} (evaluate the oracle first)")
    out = {}
    for f in files:
        rows = read_jsonl(f)
        columns = set(rows[0]) if rows else set()
        for n, row in enumerate(rows, start=1):
            if not isinstance(row.get("index"), int) or set(row) != columns:
                differ = ", ".join(sorted(columns ^ set(row))) or "index is not an integer"
                raise DataError(
                    f"{f} row {n}: not an oracle per-sample row like row 1 ({differ}); "
                    "re-run the oracle's evaluate"
                )
        out[f.stem] = rows
    return out


@app.command()
def main(
    name: str = typer.Argument(
        ..., help="item name: target, oracle or <method>-<optimizer>-s<seed>-<attack>"
    ),
    model: Path = typer.Option(..., help="model directory to evaluate"),
    splits: Path = typer.Option(..., help="directory written by `prepare`"),
    oracle: str = typer.Option(..., help="the oracle's per-sample directory, or 'self' for the oracle"),
    out: Path = typer.Option(..., help="output directory: metrics.json, info.json, samples/"),
    method: str = typer.Option(None, help="method of an unlearned model"),
    optimizer: str = typer.Option(None, help="optimizer of an unlearned model"),
    attack: str = typer.Option(None, help="attack applied to the model"),
    seed: int = typer.Option(None, help="unlearn seed of an unlearned model"),
    role: str = typer.Option(None, help="target | oracle | unlearned (default: from the name)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Evaluate MODEL with the benchmark's metric suite; forget quality, privleak and the reference
    attack are measured against the oracle."""
    with cli.user_errors():
        cfg = load_section(params, "evaluate", EvaluateConfig)
        layout = split_io.read_layout(splits)
        check_metrics(layout, cfg.metrics)  # before anything loads: the metrics must give every number
        model_cfg = load_section(params, "model", ModelConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        kind = role or (name if name in ("target", "oracle") else "unlearned")
        if kind not in ("target", "oracle", "unlearned"):
            raise UnlearnflowError(f"--role must be target, oracle or unlearned, got {kind!r}")
        info = {"model": kind, "method": method, "optimizer": optimizer, "attack": attack, "seed": seed}
        attacked = read_json(model / ATTACK_FILE) if (model / ATTACK_FILE).is_file() else {}
        # A relearning attack's pool: rows it (may have) trained on, never evaluated.
        exclude = {split: frozenset(rows) for split, rows in attacked.get("exclude", {}).items()}
        if attacked:
            info |= {
                "attack_kind": attacked.get("section", {}).get("kind"),
                "attack_stats": attacked.get("stats", {}),
                **{k: attacked[k] for k in ("curve", "weight_change", "exclude") if k in attacked},
            }
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
            if reference is not None and exclude:
                # The oracle side of forget_quality / privleak on the same rows as this model's.
                reference = {
                    split: [r for r in rows if r["index"] not in exclude.get(split, ())]
                    for split, rows in reference.items()
                }
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
                    exclude=exclude,
                ),
            )
            relative = relative_metrics(
                result,
                layout,
                result.per_sample if reference is None else reference,
                cfg.metrics,
                oracle_dir=None if reference is None else oracle,
            )
            # Per-fact answer to the forget request: each generated forget answer leaked / refused /
            # degenerate / wrong, as per-sample columns, counts and one verdict line (info.json).
            fact_split = facts.fact_split(layout, result.per_sample)
            counts: dict[str, float] = {}
            if fact_split is not None:
                rows = facts.fact_rows(
                    result.per_sample[fact_split],
                    cfg.secret_field,
                    cfg.leak_threshold,
                    source_rows=data[fact_split],
                )
                result.per_sample[fact_split] = rows
                counts = facts.fact_counts(rows)
                info["facts"] = {"split": fact_split, "verdict": facts.verdict(name, rows)}
                log.info("%s", info["facts"]["verdict"])
                run.set_tags({"facts.verdict": info["facts"]["verdict"]})
            # An undefined number (no oracle, no such split) is left out, not written as NaN.
            every = {**result.aggregates, **relative, **counts}
            metrics = {k: v for k, v in every.items() if not math.isnan(v)}
            # samples/, info.json and metrics.json (DVC outs and metrics) appear together or not at
            # all: all three go into one temp dir that replaces `out` in a single rename.
            with atomic_dir(out) as tmp:
                for split, rows in result.per_sample.items():
                    write_jsonl(tmp / "samples" / f"{split}.jsonl", rows)
                run.write_manifest(tmp / "samples" / "run.json")
                write_json(tmp / "info.json", info)
                write_json(tmp / "metrics.json", metrics)
            run.log_metrics(metrics)
            for split in result.per_sample:
                run.log_artifact(out / "samples" / f"{split}.jsonl", "samples")


if __name__ == "__main__":
    app()
