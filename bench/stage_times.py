"""Time every stage of `dvc repro` on a fresh clone of this repo, and record the resulting metrics.

Usage: python bench/stage_times.py [--out docs/pipeline-benchmark.md] [--params params.yaml]

The pipeline runs in a temporary clone of HEAD (so the workspace's DVC cache and MLflow store are
untouched), one stage item at a time in DVC's own order, each timed from the outside (process
start, imports and all) with its peak resident memory read from the child's rusage.
"""

from __future__ import annotations

import argparse
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


def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS MiB of the process tree it waited for, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pipeline-benchmark.md")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory(prefix="unlearnflow-bench-") as tmp:
        work = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        shutil.copy(args.params, work / "params.yaml")
        # The venv's editable install points at this checkout's src/: measure the clone's code instead.
        env["PYTHONPATH"] = str(work / "src")
        _, _, dry = run([*dvc, "repro", "--dry", "--force"], work, env)
        stages = re.findall(r"Running stage '([^']+)'", dry)
        rows = []
        for stage in stages:
            wall, rss, _ = run([*dvc, "repro", "--single-item", "--force", stage], work, env)
            rows.append({"stage": stage, "wall_s": round(wall, 1), "peak_rss_mib": round(rss)})
            print(f"{stage:45s} {wall:7.1f} s {rss:7.0f} MiB", flush=True)
        report = (work / "reports" / "report.md").read_text()
        summary = json.loads((work / "reports" / "summary.json").read_text())

    total = sum(r["wall_s"] for r in rows)
    lines = [
        "# Pipeline benchmark: wall time and memory of each stage",
        "",
        "Reproduced by `make bench` (`python bench/stage_times.py`): a fresh clone of HEAD, `dvc repro` one stage item",
        f"at a time, each timed from process start. Machine: {os.cpu_count()} CPU cores, {platform.machine()},",
        f"Python {platform.python_version()}, no GPU. Params: `{args.params.name}` of the commit measured.",
        "",
        "| stage | wall (s) | peak RSS (MiB) |",
        "|---|---:|---:|",
        *[f"| `{r['stage']}` | {r['wall_s']} | {r['peak_rss_mib']} |" for r in rows],
        f"| **total** | **{round(total, 1)}** | |",
        "",
        "The total is the sum of the items, each run by its own `dvc repro --single-item` (so it also pays",
        "one `dvc` start per item, which a plain `dvc repro` pays once). Per stage, with the share of the",
        "total, in [throughput.md](throughput.md).",
        "",
        "## Results of that run",
        "",
        report.split("\n", 1)[1].strip(),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    (args.out.with_suffix(".json")).write_text(
        json.dumps({"stages": rows, "total_s": total, "rows": summary}, indent=2, allow_nan=True) + "\n"
    )
    print(f"total {total:.1f} s → {args.out}")


if __name__ == "__main__":
    main()
