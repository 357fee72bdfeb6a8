"""Stage `report`: one comparison table (mean ± sd over seeds), summary JSON and trade-off plot over
every evaluated model, with the unlearn runs' health flags, the robustness tables and plots
(forget metrics before → after each attack, beside the same attacks on target and oracle), and the
per-fact answer to the forget request (a verdict line per model atop report.md, facts.md); and the
pipeline's DVC metrics, a headline per model group (``--headline``)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from unlearnflow import cli, dynamics, report, report_facts, report_plot, robustness, spread, tracking
from unlearnflow.config import AttackConfig, UnlearnConfig, load_section
from unlearnflow.headline import headline as headline_metrics
from unlearnflow.io import atomic_dir, write_json

app = cli.stage_app(__doc__)
log = logging.getLogger("report")


@app.command()
def main(
    evals: Path = typer.Option(
        ...,
        help="evaluate outputs: <evals>/{target,oracle}/, <evals>/<item>/<attack>/, <evals>/<base>-controls/<attack>/",
    ),
    unlearned: Path = typer.Option(
        ..., help="directory holding one unlearn output (health.json, item.json, steps.jsonl) per item"
    ),
    out: Path = typer.Option(..., help="report directory to write"),
    headline: Path = typer.Option(
        None, help="the DVC metrics file to write: a few headline metrics per model group (docs/remote.md)"
    ),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Collect the metrics of target, oracle and every unlearned × attacked model (each seed) into one
    report."""
    with cli.user_errors():
        unlearn = load_section(params, "unlearn", UnlearnConfig)
        attack = load_section(params, "attack", AttackConfig)
        # Only the models of the current matrix: a stale eval/ folder of a removed method is not reported.
        items = [
            (p.method, p.optimizer, s, a) for p in unlearn.pairs for s in unlearn.seeds for a in attack.names
        ]
        names = ["target", "oracle"] + [cli.item_name(m, o, s, a) for m, o, s, a in items]
        names += [f"{base}-{a}" for a in attack.controls for base in ("target", "oracle")]
        dirs = [evals / "target", evals / "oracle"]
        dirs += [evals / cli.item_name(m, o, s) / a for m, o, s, a in items]
        dirs += [evals / f"{base}-controls" / a for a in attack.controls for base in ("target", "oracle")]
        health = [None, None] + [unlearned / cli.item_name(m, o, s) / "health.json" for m, o, s, _ in items]
        health += [None] * (len(names) - len(health))
        # Read and check every input before opening a run: a malformed file is one line, nothing else.
        every = report.collect_rows(dirs, health)
        # Controls (target / oracle under an attack) are read in the robustness tables and listed
        # among every run; the main table and its comparisons keep one target and one oracle.
        rows = [r for r in every if not robustness.is_control(r)]
        records = robustness.attach_attack_info(every, dirs)
        kinds = {a: attack.args(a).kind for a in dict.fromkeys([*attack.names, *attack.controls])}
        # Per-fact outcomes of every model, in report order (target, oracle, items, controls).
        facts = [
            f for n, d in zip(names, dirs, strict=True) if (f := report_facts.read_facts(d, n)) is not None
        ]
        baseline = next((a for a in attack.names if kinds[a] == "none"), None)
        robust = robustness.summarize(records, attack.names, attack.controls, kinds)
        groups = spread.group_rows(rows)
        comparisons = spread.compare_groups(groups)
        logged = {
            "unlearn": {
                "pairs": [f"{p.method}-{p.optimizer}" for p in unlearn.pairs],
                "seeds": unlearn.seeds,
            },
            "attack": {"names": attack.names, "controls": attack.controls},
        }
        upstream = [d / "samples" / "run.json" for d in dirs]
        with tracking.stage_run(
            "report", None, experiment=cli.experiment_name(params), params=logged, upstream=upstream
        ) as run:
            flagged = report.flagged_runs(rows)
            for item, flags in flagged.items():
                log.warning("unlearn run %s flagged unhealthy: %s", item, "; ".join(flags))
            if flagged:
                run.set_tags({"report.flagged_runs": ",".join(flagged)})
            runs = {
                (m, o, s): r
                for m, o, s in dict.fromkeys((m, o, s) for m, o, s, _ in items)
                if (r := dynamics.read_run(unlearned / cli.item_name(m, o, s))) is not None
            }
            with atomic_dir(out) as tmp:
                figures = []
                for method in unlearn.methods:
                    mine = [(o, s, r["rows"]) for (m, o, s), r in runs.items() if m == method]
                    if dynamics.plot_dynamics(method, mine, tmp / f"dynamics-{method}.png"):
                        figures.append(f"![{method} dynamics](dynamics-{method}.png)")
                extra = dynamics.methods_table([(m, o, s, r) for (m, o, s), r in runs.items()])
                extra += [*(f"{f}\n" for f in figures)]
                plots = {
                    "robustness-quantize.png": robustness.plot_quantize,
                    "relearn.png": robustness.plot_relearn,
                }
                shown = [f"![{n[:-4]}]({n})" for n, plot in plots.items() if plot(robust, tmp / n)]
                extra += robustness.markdown_lines(robust, shown)
                controls = [r for r in every if robustness.is_control(r)]
                sections = {"controls": controls, "robustness": robust}
                report.write_summary(rows, groups, comparisons, tmp / "summary.json", sections)
                report.write_markdown(
                    every,
                    groups,
                    comparisons,
                    tmp / "report.md",
                    extra,
                    top=report_facts.verdict_lines(facts),
                )
                if facts:
                    report_facts.write_facts_markdown(facts, tmp / "facts.md", baseline)
                report_plot.plot_tradeoff(groups, tmp / "tradeoff.png")
                run.write_manifest(tmp / "run.json")
            if headline is not None:
                write_json(headline, headline_metrics(groups, controls, baseline))
            for path in sorted(out.iterdir()):
                if path.suffix in (".json", ".md", ".png") and path.name != "run.json":
                    run.log_artifact(path)


if __name__ == "__main__":
    app()
