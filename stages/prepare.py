"""Stage `prepare`: build or load the benchmark and write its splits (JSONL) with a manifest of counts,
hashes, and each split's kind and role."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli, tracking
from unlearnflow.config import BenchmarkConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.data.loaders import build_benchmark
from unlearnflow.io import atomic_dir

app = cli.stage_app(__doc__)


@app.command()
def main(
    out: Path = typer.Option(..., help="directory of the split files (a DVC out)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Build (synthetic) or load (tofu, muse, wmdp, custom) the benchmark and write its splits."""
    with cli.user_errors():
        bench = load_section(params, "benchmark", BenchmarkConfig)
        with tracking.stage_run(
            "prepare", None, experiment=cli.experiment_name(params), params={"benchmark": bench.model_dump()}
        ) as run:
            benchmark = build_benchmark(bench)
            with atomic_dir(out) as tmp:
                manifest = split_io.write_splits(benchmark, tmp, meta={"benchmark": bench.model_dump()})
                run.write_manifest(tmp / "run.json")
            run.log_metrics({f"n_{name}": float(n) for name, n in manifest["counts"].items()})
            for name in benchmark.splits:
                run.log_dataset(out / f"{name}.jsonl", name=name, context="prepare")


if __name__ == "__main__":
    app()
