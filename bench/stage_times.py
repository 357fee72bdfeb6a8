"""Time the default `dvc repro` on a fresh clone of this repo, stage by stage, and record its metrics.

Usage: python bench/stage_times.py [--out docs/pipeline-benchmark.md] [--params params.yaml] [--workdir DIR]

The pipeline runs in a clone of HEAD (a temporary one unless ``--workdir``; the workspace's DVC
cache and MLflow store are untouched) as one plain ``dvc repro``, the command the README gives.
Each stage item's wall time runs from DVC's "Running stage" line to the next one (so it includes
the item's process start, imports and DVC's bookkeeping after it); the last ends when DVC exits.
Peak memory is the largest single process of the run (the children's rusage).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_repro(
    args: list[str], cwd: Path, env: dict[str, str]
) -> tuple[list[tuple[str, float]], float, float]:
    """Run ``dvc repro``, echoing its output; return each stage item's wall seconds (from its
    "Running stage" line to the next, or to the exit), the total, and the peak RSS in MiB."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    marks: list[tuple[str, float]] = []
    tail: collections.deque[str] = collections.deque(maxlen=200)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"Running stage '([^']+)'", line)
        if found:
            now = time.perf_counter() - start
            if marks:
                print(f"{marks[-1][0]:45s} {now - marks[-1][1]:7.1f} s", flush=True)
            marks.append((found.group(1), now))
        tail.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(args)} failed:\n{''.join(tail)[-3000:]}")
    ends = [t for _, t in marks[1:]] + [total]
    items = [(name, end - begin) for (name, begin), end in zip(marks, ends, strict=True)]
    if items:
        print(f"{items[-1][0]:45s} {items[-1][1]:7.1f} s", flush=True)
    return items, total, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pipeline-benchmark.md")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--workdir", type=Path, help="keep the clone (models, outputs) here instead of a temporary directory"
    )
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory(prefix="unlearnflow-bench-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp) / "repo"
        if work.exists():
            sys.exit(f"--workdir {work} exists: give a new directory")
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        shutil.copy(args.params, work / "params.yaml")
        # The venv's editable install points at this checkout's src/: measure the clone's code instead.
        env["PYTHONPATH"] = str(work / "src")
        # Git and DVC set up as a user's fresh clone has them; the clock starts at `dvc repro`.
        items, total, rss = timed_repro([*dvc, "repro"], work, env)
        rows = [{"stage": name, "wall_s": round(sec, 1)} for name, sec in items]
        report = (work / "reports" / "report.md").read_text()
        summary = json.loads((work / "reports" / "summary.json").read_text())

    lines = [
        "# Pipeline benchmark: the default `dvc repro`, stage by stage",
        "",
        "Reproduced by `make bench` (`python bench/stage_times.py`): a fresh clone of HEAD, one plain `dvc repro`",
        f"(the README's command), each stage item timed from DVC's start of it to the next. Machine: {os.cpu_count()}",
        f"CPU cores, {platform.machine()}, Python {platform.python_version()}, no GPU. Params: `{args.params.name}`",
        f"of the commit measured. Total **{total:.0f} s** ({total / 60:.1f} min); largest process {rss:.0f} MiB.",
        "",
        "| stage item | wall (s) |",
        "|---|---:|",
        *[f"| `{r['stage']}` | {r['wall_s']} |" for r in rows],
        f"| **total (`dvc repro`, start to exit)** | **{round(total, 1)}** |",
        "",
        "An item's time includes its process start, imports and DVC's bookkeeping after it. Per stage,",
        "with the share of the total, in [throughput.md](throughput.md).",
        "",
        "## Results of that run",
        "",
        report.split("\n", 1)[1].strip(),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(
        json.dumps(
            {"mode": "one dvc repro", "stages": rows, "total_s": total, "peak_rss_mib": rss, "rows": summary},
            indent=2,
            allow_nan=True,
        )
        + "\n"
    )
    print(f"total {total:.1f} s → {args.out}")


if __name__ == "__main__":
    main()
