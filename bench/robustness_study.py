"""The robustness study of docs/robustness.md: methods × optimizer grades × attacks × seeds, in one command.

Usage: python bench/robustness_study.py [--workdir /tmp/unlearnflow-study] [--regimes default]
       [--methods grad_diff,npo,pdu] [--optimizers adamw,signadam,zo_adam,fo_zo] [--seeds 0,1,2]
       [--out docs/robustness-study]

It is the pipeline itself, not a copy of it: the project's tracked files go into ``--workdir`` (a
fresh git + DVC repository the first time, reused after), params.yaml gets the study's matrix
(``unlearn.pairs`` = methods × optimizers, ``attack.names`` = none, quantize_4bit, quantize_8bit,
relearn, the same attacks as controls on target and oracle) and ``dvc repro`` runs it, one line of
progress per stage item (``[k/N] item, elapsed, ETA``). Regimes (``--regimes default,gentle`` for both):

* ``default``: the optimizers' own learning rates (params.yaml, chosen to unlearn: docs/optimizers.md);
* ``gentle``: every learning rate scaled by ``GENTLE_SCALE`` — unlearning that moves the weights by
  far less than one 4-bit quantization step while forget prob still falls (the regime of the
  published quantization failure; each run reports its q4_code_change to show where it sits).

The regimes run one after the other in the same workdir, so prepare, finetune and the controls
run once (DVC skips them), and after each the report (tables, plots, summary.json) is copied to
``--out/<regime>/`` with the wall time of every stage item (``timing.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ["none", "quantize_4bit", "quantize_8bit", "relearn"]
# The gentle regime: each optimizer's learning rate (and fo_zo's ZO-phase rate) times this factor.
GENTLE_SCALE = 1 / 3


def sh(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    log: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[float, str]]:
    """Run ``cmd``; stream to ``log`` and each line to ``progress`` when given; return (arrival time,
    line) pairs; raise with the tail of the output on failure."""
    out: list[tuple[float, str]] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        assert p.stdout is not None
        with open(log, "a") if log else open(os.devnull, "w") as f:
            for line in p.stdout:
                out.append((time.time(), line))
                f.write(line)
                f.flush()
                if progress is not None:
                    progress(line)
    if p.returncode:
        tail = "".join(line for _, line in out[-40:])
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{tail}")
    return out


def pipeline_env(workdir: Path, who: str) -> dict[str, str]:
    """The environment of a pipeline run in ``workdir``: the venv first on PATH, the workdir's own
    sources, no telemetry, no hub, and a git identity ``who`` for its commits."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(workdir / "src"),
        "GIT_AUTHOR_NAME": who,
        "GIT_AUTHOR_EMAIL": f"{who}@example.invalid",
        "GIT_COMMITTER_NAME": who,
        "GIT_COMMITTER_EMAIL": f"{who}@example.invalid",
    }


def setup(workdir: Path, env: dict[str, str]) -> None:
    """A fresh repository with the project's tracked files (once; later runs reuse it)."""
    if (workdir / ".git").is_dir():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if name.startswith("docs/robustness-study/"):
            continue
        dst = workdir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dst)
    (workdir / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    sh(["git", "init", "-q", "-b", "main"], workdir, env)
    if not (workdir / ".dvc" / "config").is_file():  # the project's own .dvc/ is tracked
        sh([sys.executable, "-m", "dvc", "init", "-q"], workdir, env)
    sh(["git", "add", "-A"], workdir, env)
    sh(["git", "commit", "-qm", "study"], workdir, env)


def study_params(
    base: dict, regime: str, methods: list[str], optimizers: list[str], seeds: list[int]
) -> dict:
    """params.yaml of one regime: the study's matrix, learning rates scaled for ``gentle``."""
    params = json.loads(json.dumps(base))
    unlearn = params["unlearn"]
    unlearn["pairs"] = [{"method": m, "optimizer": o} for m in methods for o in optimizers]
    unlearn["seeds"] = seeds
    params["attack"]["names"] = ATTACKS
    params["attack"]["controls"] = ATTACKS[1:]
    if regime == "gentle":
        for opt in optimizers:
            section = unlearn["optimizer_args"].setdefault(opt, {}) or {}
            section["lr"] = (section.get("lr") or unlearn["lr"]) * GENTLE_SCALE
            if section.get("zo_lr"):
                section["zo_lr"] *= GENTLE_SCALE
            unlearn["optimizer_args"][opt] = section
    return params


def planned_items(params: dict) -> int:
    """Stage items of one ``dvc repro`` of ``params``: check_params, prepare, finetune ×2, unlearn and
    attack per pair × seed, evaluate_base ×2, attack_control ×2, report."""
    models = len(params["unlearn"]["pairs"]) * len(params["unlearn"]["seeds"])
    return 1 + 1 + 2 + 2 * models + 2 + 2 + 1


class Progress:
    """One line per stage item as DVC starts or skips it: ``[k/N] item, elapsed, ETA`` (the ETA from
    the mean wall time of the items run so far)."""

    def __init__(self, total: int, tag: str) -> None:
        self.total, self.tag, self.start = total, tag, time.time()
        self.done = self.ran = 0

    def __call__(self, line: str) -> None:
        ran = re.search(r"Running stage '([^']+)'", line)
        skipped = re.search(r"Stage '([^']+)' didn't change, skipping", line)
        if not (ran or skipped):
            return
        self.done += 1
        self.ran += bool(ran)
        elapsed = time.time() - self.start
        left = max(0, self.total - self.done)
        eta = elapsed / max(1, self.ran - 1) * left if self.ran > 1 else float("nan")
        what = "running" if ran else "unchanged"
        name = (ran or skipped).group(1)  # type: ignore[union-attr]
        clock = f"{elapsed / 60:.1f} min elapsed" + (f", ~{eta / 60:.0f} min left" if eta == eta else "")
        print(f"[{self.tag}] [{self.done}/{self.total}] {what} {name} ({clock})", flush=True)


def stage_times(lines: list[tuple[float, str]], finished: float) -> dict[str, object]:
    """Wall time per stage (DVC's name before ``@``): each item from its "Running stage" line to the
    next one (or the end); stages DVC skipped cost ~0 and are not counted."""
    marks = [(t, m.group(1)) for t, line in lines if (m := re.search(r"Running stage '([^']+)'", line))]
    per_stage: dict[str, float] = {}
    items: dict[str, int] = {}
    for (t, name), (t_next, _) in zip(marks, [*marks[1:], (finished, "")], strict=True):
        stage = name.split("@")[0]
        per_stage[stage] = per_stage.get(stage, 0.0) + t_next - t
        items[stage] = items.get(stage, 0) + 1
    return {
        "stages": {k: {"items": items[k], "wall_s": round(v, 1)} for k, v in per_stage.items()},
        "items_run": len(marks),
    }


def phase_times(evals: Path) -> dict[str, float]:
    """Seconds spent in each phase of the attack / evaluate items, summed from their info.json:
    model loads, each attack (by name) and the metric suite."""
    total: dict[str, float] = {}
    for info_file in sorted(evals.rglob("info.json")):
        info = json.loads(info_file.read_text())
        for phase, sec in info.get("seconds", {}).items():
            key = f"attack {info.get('attack')}" if phase == "attack" else phase
            total[key] = round(total.get(key, 0.0) + sec, 1)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/unlearnflow-study"))
    ap.add_argument("--regimes", default="default")
    ap.add_argument("--methods", default="grad_diff,npo,pdu")
    ap.add_argument("--optimizers", default="adamw,signadam,zo_adam,fo_zo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "robustness-study")
    args = ap.parse_args()
    env = pipeline_env(args.workdir.resolve(), "study")
    workdir = args.workdir.resolve()
    setup(workdir, env)
    # The params the workdir's code was copied with (its first commit), not the project's current
    # ones: a reused workdir keeps its code, and newer params may hold keys that code does not know.
    committed = ["git", "show", "HEAD:params.yaml"]
    base = yaml.safe_load(
        subprocess.run(committed, cwd=workdir, capture_output=True, text=True, check=True).stdout
    )
    for regime in args.regimes.split(","):
        params = study_params(
            base,
            regime,
            args.methods.split(","),
            args.optimizers.split(","),
            [int(s) for s in args.seeds.split(",")],
        )
        (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        log = workdir / f"repro-{regime}.log"
        log.write_text("")
        print(f"[{regime}] dvc repro in {workdir} (log: {log})", flush=True)
        start = time.time()
        progress = Progress(planned_items(params), regime)
        lines = sh([sys.executable, "-m", "dvc", "repro"], workdir, env, log, progress)
        end = time.time()
        timing = {
            "wall_s": round(end - start, 1),
            **stage_times(lines, end),
            "phases_s": phase_times(workdir / "eval"),
        }
        dest = args.out / regime
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in (workdir / "reports").iterdir():
            if f.suffix in (".md", ".png") or f.name == "summary.json":
                shutil.copy2(f, dest / f.name)
        (dest / "params-overlay.json").write_text(
            json.dumps(
                {
                    "unlearn.pairs": params["unlearn"]["pairs"],
                    "unlearn.seeds": params["unlearn"]["seeds"],
                    "unlearn.optimizer_args": {
                        o: params["unlearn"]["optimizer_args"].get(o) for o in args.optimizers.split(",")
                    },
                    "unlearn.lr": params["unlearn"]["lr"],
                    "attack.names": params["attack"]["names"],
                    "attack.controls": params["attack"]["controls"],
                },
                indent=2,
            )
            + "\n"
        )
        (dest / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        print(f"[{regime}] done in {timing['wall_s']:.0f} s: {dest}", flush=True)


if __name__ == "__main__":
    main()
