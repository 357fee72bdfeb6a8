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

``--jobs N`` (default 2, one per core) runs the unlearn and attack items N at a time, each process on
one torch thread: a model this small leaves a second thread mostly idle (two one-thread items run
1.45× the items per second of one two-thread item here), and process start-up, DVC and the
evaluator's Python are single-threaded anyway. It is still DVC: ``dvc repro`` of the shared upstream
(prepare, finetune, the base evaluations), then the models split into N balanced shards, each a
queued experiment (``dvc exp run --queue``, ``dvc queue start -j N``) whose items DVC tracks and
whose stage runs go into the project's MLflow store, then one ``dvc repro`` of the whole matrix in
the workdir, which DVC's run cache fills from the shards' results without rerunning them (and runs
the report). ``--jobs 1`` is one plain ``dvc repro``.
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
TARGET_EPOCHS = 40
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
    # The target the study was measured on (docs/robustness.md): the default's is 20 epochs, for time.
    params["finetune"]["epochs"] = TARGET_EPOCHS
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
        # Unchanged, or restored from DVC's run cache (the shards' items when --jobs > 1).
        skipped = re.search(r"Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)", line)
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


def stage_times(
    lines: list[tuple[float, str]], finished: float, *more: tuple[list, float]
) -> dict[str, object]:
    """Wall time per stage (DVC's name before ``@``): each item from its "Running stage" line to the
    next one (or the end of its command); stages DVC skipped cost ~0 and are not counted. ``more``:
    further (lines, finished) of other commands, so that no item is charged for the time between them."""
    per_stage: dict[str, float] = {}
    items: dict[str, int] = {}
    runs = 0
    for seg_lines, seg_end in [(lines, finished), *more]:
        marks = [
            (t, m.group(1)) for t, line in seg_lines if (m := re.search(r"Running stage '([^']+)'", line))
        ]
        runs += len(marks)
        for (t, name), (t_next, _) in zip(marks, [*marks[1:], (seg_end, "")], strict=True):
            stage = name.split("@")[0]
            per_stage[stage] = per_stage.get(stage, 0.0) + t_next - t
            items[stage] = items.get(stage, 0) + 1
    return {
        "stages": {k: {"items": items[k], "wall_s": round(v, 1)} for k, v in per_stage.items()},
        "items_run": runs,
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


# Rough seconds of one model's items on this machine kind (the 2026-12-02 study, two threads): its
# attack item, its unlearn item's fixed cost, and training per epoch of the embedded forget set. Only
# used to balance the shards; a wrong guess costs balance, never results.
ATTACK_ITEM_S = 85.0
UNLEARN_FIXED_S = 12.0
TRAIN_EPOCH_S = 1.1


def pair_cost(params: dict, pair: dict) -> float:
    """Estimated seconds of one (method, optimizer) pair per seed: its attack item plus its unlearn
    item, whose training grows with the epochs it runs (the optimizer's own, else the method's, else
    ``unlearn.epochs``: the precedence of ``matrix.item_config``)."""
    unlearn = params["unlearn"]
    own = [
        (unlearn.get("optimizer_args") or {}).get(pair["optimizer"]) or {},
        (unlearn.get("method_args") or {}).get(pair["method"]) or {},
    ]
    epochs = next((a["epochs"] for a in own if a.get("epochs") is not None), unlearn["epochs"])
    return ATTACK_ITEM_S + UNLEARN_FIXED_S + TRAIN_EPOCH_S * float(epochs)


def shard_pairs(params: dict, jobs: int, head_start: float = 0.0) -> list[list[dict]]:
    """``unlearn.pairs`` split into at most ``jobs`` shards of about equal estimated cost (longest
    first onto the least loaded shard). Shard 0 starts with ``head_start`` seconds (the controls it
    also runs). Each shard keeps the pairs in their original order; empty shards are dropped."""
    pairs = params["unlearn"]["pairs"]
    loads = [head_start] + [0.0] * (jobs - 1)
    members: list[list[int]] = [[] for _ in range(jobs)]
    for i in sorted(range(len(pairs)), key=lambda i: -pair_cost(params, pairs[i])):
        k = min(range(jobs), key=lambda k: loads[k])
        members[k].append(i)
        loads[k] += pair_cost(params, pairs[i])
    return [[pairs[i] for i in sorted(m)] for m in members if m]


def item_seconds(db: Path, since: float) -> dict[str, dict[str, float]]:
    """Per stage, the items' own run time (MLflow start to end) of the runs started after ``since``
    (epoch seconds): with items running side by side, the honest breakdown of where the work went."""
    import sqlite3

    query = """SELECT t.value, r.start_time, r.end_time FROM runs r
               JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'unlearnflow.stage'
               WHERE r.start_time >= ? AND r.end_time IS NOT NULL AND t.value != 'pipeline'"""
    out: dict[str, dict[str, float]] = {}
    with sqlite3.connect(db) as con:
        for stage, start, end in con.execute(query, (int(since * 1000),)):
            row = out.setdefault(stage, {"runs": 0, "run_s": 0.0})
            row["runs"] += 1
            row["run_s"] = round(row["run_s"] + (end - start) / 1000, 1)
    return out


def wait_for_queue(
    workdir: Path, env: dict[str, str], names: list[str], total: int, tag: str, log: Path
) -> None:
    """Poll ``dvc queue status`` until the shards have finished; print a progress line whenever
    another unlearn or attack item of the shards' temporary workspaces completes."""
    start, seen = time.time(), set()
    exps = workdir / ".dvc" / "tmp" / "exps"
    while True:
        done = {p.parent.name for p in exps.glob("*/*/unlearned/*/run.json")}
        done |= {f"attack:{p.parent.parent.name}" for p in exps.glob("*/*/eval/*/none/metrics.json")}
        for name in sorted(done - seen):
            seen.add(name)
            elapsed = time.time() - start
            eta = elapsed / len(seen) * max(0, total - len(seen))
            print(
                f"[{tag}] [shards {len(seen)}/{total}] finished {name} "
                f"({elapsed / 60:.1f} min, ~{eta / 60:.0f} min left)",
                flush=True,
            )
        # `dvc queue status`: "<task> <name> <created> <status>" per experiment.
        status: dict[str, str] = {}
        for _, line in sh([sys.executable, "-m", "dvc", "queue", "status"], workdir, env):
            cells = line.split()
            if len(cells) >= 4 and cells[1] in names:
                status[cells[1]] = cells[-1]
        if set(status) == set(names) and all(v not in ("Queued", "Running") for v in status.values()):
            break
        time.sleep(10)
    failed = [n for n, v in status.items() if v != "Success"]
    if failed:
        logs = "".join(
            line for _, line in sh([sys.executable, "-m", "dvc", "queue", "logs", failed[0]], workdir, env)
        )
        raise SystemExit(f"shard(s) {failed} did not succeed ({status}); {failed[0]}'s log:\n{logs[-4000:]}")
    with open(log, "a") as f:
        for name in names:
            f.writelines(
                line for _, line in sh([sys.executable, "-m", "dvc", "queue", "logs", name], workdir, env)
            )


def run_sharded(workdir: Path, env: dict[str, str], params: dict, regime: str, jobs: int, log: Path) -> dict:
    """The regime's ``dvc repro`` with unlearn and attack items ``jobs`` at a time (module docstring)."""
    dvc = [sys.executable, "-m", "dvc"]
    start = time.time()
    models = len(params["unlearn"]["pairs"]) * len(params["unlearn"]["seeds"])
    progress = Progress(1 + 1 + 2 + 2, f"{regime} upstream")
    upstream = ["check_params", "prepare", "finetune", "evaluate_base"]
    lines = sh([*dvc, "repro", *upstream], workdir, env, log, progress)
    t_upstream = time.time()
    # A queued experiment runs in a clone of the last commit plus the workspace's changes: commit the
    # upstream's dvc.lock so that every shard finds prepare and finetune done.
    sh(["git", "add", "-A"], workdir, env)
    sh(["git", "commit", "-qm", f"study {regime}: upstream", "--allow-empty"], workdir, env)
    # No head start for the controls of shard 0: with few pairs it would leave shard 0 without any,
    # and the controls would then run in a shard of one thread next to nothing.
    shards = shard_pairs(params, jobs)
    names = []
    for k, pairs in enumerate(shards):
        shard = json.loads(json.dumps(params))
        shard["unlearn"]["pairs"] = pairs
        (workdir / "params.yaml").write_text(yaml.safe_dump(shard, sort_keys=False))
        name = f"study-{regime}-{int(start)}-{k}"
        targets = ["attack", *(["attack_control"] if k == 0 else [])]
        sh([*dvc, "exp", "run", "--queue", "--name", name, *targets], workdir, env, log)
        names.append(name)
        listed = ", ".join(f"{p['method']}-{p['optimizer']}" for p in pairs)
        print(f"[{regime}] shard {k}: {listed}", flush=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # One torch thread per item: `jobs` items share the cores (the celery workers inherit this env).
    sh([*dvc, "queue", "start", "-j", str(jobs)], workdir, {**env, "OMP_NUM_THREADS": "1"}, log)
    wait_for_queue(workdir, env, names, 2 * models, regime, log)
    t_queue = time.time()
    # The whole matrix in the workdir: DVC's run cache restores the shards' items; the report runs.
    progress = Progress(planned_items(params), f"{regime} collect")
    collect = sh([*dvc, "repro"], workdir, env, log, progress)
    end = time.time()
    return {
        "wall_s": round(end - start, 1),
        "jobs": jobs,
        "parts_s": {
            "upstream (prepare, finetune, base evaluations)": round(t_upstream - start, 1),
            f"shards ({jobs} at a time: unlearn, attack, controls)": round(t_queue - t_upstream, 1),
            "collect (run-cache restore) and report": round(end - t_queue, 1),
        },
        "shards": [[f"{p['method']}-{p['optimizer']}" for p in pairs] for pairs in shards],
        "item_run_s": item_seconds(workdir / "mlflow.db", start),
        # the main process's items only (upstream, then collect): the shards' are in item_run_s
        **stage_times(lines, t_upstream, (collect, end)),
    }


def write_summary(src: Path, dest: Path) -> None:
    """The report's summary.json without its pairwise ``comparisons`` (quadratic in the groups: 1.7 MB
    for the study, and report.md's "Which differences hold across seeds" already states the ones that
    hold); the full file stays in the workdir's reports/."""
    summary = json.loads(src.read_text())
    summary.pop("comparisons", None)
    dest.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/unlearnflow-study"))
    ap.add_argument("--regimes", default="default")
    ap.add_argument("--methods", default="grad_diff,npo,pdu")
    ap.add_argument("--optimizers", default="adamw,signadam,zo_adam,fo_zo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "robustness-study")
    ap.add_argument("--jobs", type=int, default=2, help="unlearn / attack items at a time (1: one dvc repro)")
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
        if args.jobs > 1:
            timing = run_sharded(workdir, env, params, regime, args.jobs, log)
        else:
            start = time.time()
            progress = Progress(planned_items(params), regime)
            lines = sh([sys.executable, "-m", "dvc", "repro"], workdir, env, log, progress)
            end = time.time()
            timing = {"wall_s": round(end - start, 1), "jobs": 1, **stage_times(lines, end)}
        timing["phases_s"] = phase_times(workdir / "eval")
        dest = args.out / regime
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in (workdir / "reports").iterdir():
            if f.suffix in (".md", ".png"):
                shutil.copy2(f, dest / f.name)
        write_summary(workdir / "reports" / "summary.json", dest / "summary.json")
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
