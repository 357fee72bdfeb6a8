"""Stage `report`: one comparison table, summary JSON and trade-off plot over every evaluated model."""

from __future__ import annotations

from pathlib import Path

import typer

from unlearnflow import cli, report, tracking
from unlearnflow.config import AttackConfig, UnlearnConfig, load_section
from unlearnflow.io import atomic_dir

app = cli.stage_app(__doc__)


@app.command()
def main(
    evals: Path = typer.Option(..., help="directory holding one evaluate output per model"),
    out: Path = typer.Option(..., help="report directory to write"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Collect the metrics of target, oracle and every unlearned × attacked model into one report."""
    with cli.user_errors():
        unlearn = load_section(params, "unlearn", UnlearnConfig)
        attack = load_section(params, "attack", AttackConfig)
        # Only the models of the current matrix: a stale eval/ folder of a removed method is not reported.
        names = ["target", "oracle"] + [
            f"{m}-{o}-{a}" for m in unlearn.methods for o in unlearn.optimizers for a in attack.names
        ]
        logged = {
            "unlearn": {"methods": unlearn.methods, "optimizers": unlearn.optimizers},
            "attack": {"names": attack.names},
        }
        upstream = [evals / n / "samples" / "run.json" for n in names]
        with tracking.stage_run(
            "report", None, experiment=cli.experiment_name(params), params=logged, upstream=upstream
        ) as run:
            rows = report.collect_rows([evals / n for n in names])
            with atomic_dir(out) as tmp:
                report.write_summary(rows, tmp / "summary.json")
                report.write_markdown(rows, tmp / "report.md")
                report.plot_tradeoff(rows, tmp / "tradeoff.png")
                run.write_manifest(tmp / "run.json")
            for name in ("summary.json", "report.md", "tradeoff.png"):
                run.log_artifact(out / name)


if __name__ == "__main__":
    app()
