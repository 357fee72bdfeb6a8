"""Start-up cost of the stage scripts against ``python -c "import torch"``, measured in one run.

Usage: python bench/startup.py [--rounds 5] [--quick] [--stages prepare unlearn …]
                               [--splits data/splits] [--model models/target] [--out docs/startup.md]

Three kinds of process, run alternately in each round so that a change in the machine's load hits
all of them alike:

* ``python -c "import torch"``: the floor every stage that touches a model pays;
* ``python stages/<stage>.py --help``: import cost of the stage script;
* the stage with real arguments, up to its *first real work*: the first call that reads its main
  input after set-up (config, checks, the MLflow run). ``bench/_first_work.py`` loads the stage,
  replaces that call by a hook that records the time and stops the stage, and runs its Typer app.
  The calls hooked (the first one reached fires): ``prepare`` building its benchmark, ``finetune``
  reading its training rows (or the base model), ``unlearn`` / ``evaluate`` / ``attack`` loading the
  model, ``report`` reading the evaluation folders, ``check_params`` reading the params file.

Every time runs from just before the process is spawned (interpreter start-up included). The
table gives the median over the rounds and its ratio to the torch import's median; the goal
(issue 13) is at most 1.3 for every row. A first, untimed round creates the bench's own MLflow
store (a temporary SQLite file: the project's ``mlflow.db`` is untouched) and warms the page cache.
Without ``data/splits`` and ``models/target`` the bench builds both in a temporary folder (the
splits from ``params.yaml``'s benchmark, an untrained model of its ``model.scratch`` shape).
``--out`` writes the table (Markdown) and a JSON beside it; without it the table is only printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "bench" / "_first_work.py"
GOAL_RATIO = 1.3
STAGES = ("check_params", "prepare", "finetune", "unlearn", "evaluate", "attack", "report")
# The first call of each stage that reads its main input (module:attribute; "stage" is the stage
# script's own namespace). Several per stage: whichever the stage reaches first fires.
MODEL_LOAD = ("unlearnflow.modeling:load_tokenizer", "unlearnflow.modeling:load_model")
HOOKS = {
    "check_params": ("stage:validate_params",),
    "prepare": ("stage:build_benchmark",),
    "finetune": ("unlearnflow.data.splits:read_splits", *MODEL_LOAD),
    "unlearn": MODEL_LOAD,
    "evaluate": MODEL_LOAD,
    "attack": MODEL_LOAD,
    "report": ("unlearnflow.report:collect_rows",),
}


def stage_args(stage: str, inputs: dict[str, Path], params: Path, out: Path) -> list[str]:
    """The real arguments of one stage item, as dvc.yaml passes them (outputs under ``out``)."""
    pair = yaml.safe_load(params.read_text())["unlearn"]["pairs"][0]
    data = ["--model", str(inputs["model"]), "--splits", str(inputs["splits"])]
    args = {
        "check_params": ["--out", str(out / "params_checked.json")],
        "prepare": ["--out", str(out / "splits")],
        "finetune": ["target", "--splits", str(inputs["splits"]), "--out", str(out / "target")],
        "unlearn": [pair["method"], pair["optimizer"], *data, "--out", str(out / "u")],
        "evaluate": ["oracle", *data, "--oracle", "self", "--out", str(out / "e")],
        # The controls list: attacks that change the weights, so the model is loaded.
        "attack": ["target", "--attacks", "controls", *data, "--oracle", "self", "--out", str(out / "a")],
        "report": [
            "--evals",
            str(ROOT / "eval"),
            "--unlearned",
            str(ROOT / "unlearned"),
            "--out",
            str(out / "r"),
        ],
    }
    return [*args[stage], "--params", str(params)]


def build_inputs(params: Path, where: Path) -> dict[str, Path]:
    """Splits from the params' benchmark and an untrained model of the scratch shape (start-up only)."""
    from unlearnflow import modeling
    from unlearnflow.config import BenchmarkConfig, ModelConfig, load_section
    from unlearnflow.data import splits as split_io
    from unlearnflow.data.loaders import build_benchmark

    bench = load_section(params, "benchmark", BenchmarkConfig)
    split_io.write_splits(build_benchmark(bench), where / "splits", meta={"benchmark": bench.model_dump()})
    data = split_io.read_splits(where / "splits")
    model_cfg = load_section(params, "model", ModelConfig)
    tok = modeling.train_bpe_tokenizer(
        split_io.corpus_texts(data, split_io.read_layout(where / "splits")), model_cfg.scratch.vocab_size
    )
    model = modeling.build_scratch(tok, model_cfg, seed=0)
    modeling.save_pretrained(model, tok, where / "target")
    return {"splits": where / "splits", "model": where / "target"}


def timed(cmd: list[str], env: dict[str, str], stamp: Path | None = None) -> float:
    """Seconds from just before spawning ``cmd`` to its exit, or to the time it wrote in ``stamp``."""
    if stamp is not None:
        stamp.unlink(missing_ok=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0 or (stamp is not None and not stamp.is_file()):
        raise RuntimeError(f"{' '.join(cmd[:3])} … failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return (float(stamp.read_text()) if stamp is not None else end) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds, no warm-up of --help")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--splits", type=Path, default=ROOT / "data" / "splits")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "target")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--out", type=Path, default=None, help="write this Markdown file and a .json beside it"
    )
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="unlearnflow-startup-") as tmp_dir:
        tmp = Path(tmp_dir)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        inputs = {"splits": args.splits, "model": args.model}
        if not (args.splits / "manifest.json").is_file() or not (args.model / "config.json").is_file():
            print(f"no {args.splits} or {args.model}: building both under {tmp}", flush=True)
            inputs = build_inputs(args.params, tmp)
        stamp = tmp / "stamp"
        jobs: dict[str, tuple[list[str], Path | None]] = {
            "import torch": ([python, "-c", "import torch"], None)
        }
        for stage in args.stages:
            script = str(ROOT / "stages" / f"{stage}.py")
            jobs[f"{stage} --help"] = ([python, script, "--help"], None)
            hooks = ",".join(HOOKS[stage])
            argv = stage_args(stage, inputs, args.params, tmp / "out")
            jobs[f"{stage} first work"] = (
                [python, str(WRAPPER), str(stamp), script, hooks, "--", *argv],
                stamp,
            )
        times: dict[str, list[float]] = {name: [] for name in jobs}
        errors: dict[str, str] = {}
        for r in range(rounds + 1):  # round 0: warm-up, not recorded
            for name, (cmd, st) in jobs.items():
                if name in errors or (r == 0 and args.quick and name.endswith("--help")):
                    continue
                try:
                    seconds = timed(cmd, env, st)
                except RuntimeError as exc:
                    errors[name] = str(exc)
                    print(f"{name}: ERROR\n{exc}", file=sys.stderr, flush=True)
                    continue
                if r > 0:
                    times[name].append(seconds)
            print(f"round {r}{' (warm-up)' if r == 0 else ''} done", flush=True)
        shutil.rmtree(tmp / "out", ignore_errors=True)
    record = summarize(times, errors, rounds, load_before)
    text = render(record)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def summarize(times: dict[str, list[float]], errors: dict[str, str], rounds: int, load: tuple) -> dict:
    torch_median = statistics.median(times["import torch"])
    rows = []
    for name, values in times.items():
        if not values:
            # The stage's last words (e.g. its usage error), not the command line.
            lines = [line for line in errors.get(name, "no value").splitlines() if line.strip()]
            rows.append({"item": name, "error": lines[-1].strip("│ ")})
            continue
        median = statistics.median(values)
        rows.append(
            {
                "item": name,
                "median_s": round(median, 3),
                "min_s": round(min(values), 3),
                "max_s": round(max(values), 3),
                "ratio_vs_torch": round(median / torch_median, 2),
            }
        )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "rounds": rounds,
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "goal_ratio": GOAL_RATIO,
        "rows": rows,
    }


def render(record: dict) -> str:
    lines = [
        "# Stage start-up against `import torch`",
        "",
        "Reproduce: `python bench/startup.py --out docs/startup.md` (bench/startup.py says what is timed).",
        f"Machine: {record['machine']}; {record['rounds']} rounds, median (min–max); load average",
        f"before {record['load_average_before'][0]}, after {record['load_average_after'][0]}.",
        f"Goal (issue 13): every ratio ≤ {record['goal_ratio']}.",
        "",
        "| item | median (s) | min–max (s) | × torch |",
        "|---|---:|---:|---:|",
    ]
    for row in record["rows"]:
        if "error" in row:
            lines.append(f"| {row['item']} | error: {row['error']} | | |")
            continue
        flag = "" if row["ratio_vs_torch"] <= record["goal_ratio"] else " ✗"
        lines.append(
            f"| {row['item']} | {row['median_s']:.2f} | {row['min_s']:.2f}–{row['max_s']:.2f} "
            f"| {row['ratio_vs_torch']:.2f}{flag} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
