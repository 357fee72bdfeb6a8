"""docs/throughput.md: issue 13's goals, one table each, read from the bench scripts' JSON outputs.

Usage: python bench/throughput_summary.py [--docs docs] [--out docs/throughput.md]

It measures nothing itself: each table comes from the JSON a bench script wrote beside its own
Markdown (the command that reproduces it is in the table's heading), so the summary always says
what the last run of each bench said. A missing input is reported as "not measured", never guessed.

* evaluation vs the reference: ``eval-vs-reference*.json`` (bench/eval_vs_reference.py);
* start-up: ``startup.json`` (bench/startup.py);
* training throughput: ``train-throughput.json`` (bench/train_throughput.py);
* the default ``dvc repro``: ``pipeline-benchmark.json`` (bench/stage_times.py);
* the robustness study: ``robustness-study/default/timing.json`` (bench/robustness_study.py);
* where an item's time goes: ``cost-breakdown.md`` (bench/cost_breakdown.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

EVAL_GOAL = 3.0  # reference loop / ours, at least
STARTUP_GOAL = 1.3  # stage / `import torch`, at most
MFU_GOAL = 0.5  # step GFLOP/s / matmul peak, at least
REPRO_LIMIT_S = 600.0
STUDY_LIMIT_S = 3600.0


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def eval_section(docs: Path) -> list[str]:
    runs = sorted(docs.glob("eval-vs-reference*.json"))
    lines = [
        "## Evaluation ≥ 3× the reference's metric loop",
        "",
        "`bench/eval_vs_reference.py` (`make bench-vs-reference REF=<open-unlearning checkout>`): the",
        "reference's TOFU evaluator and ours on the same checkpoint, token-identical inputs, the same 23",
        "numbers, alternating rounds. Seconds are the metric loop (model loaded, data tokenised).",
        "",
    ]
    if not runs:
        return [*lines, "Not measured.", ""]
    lines += [
        "| model | reference (s, median) | ours (s, median) | ratio (median) | ratio (worst round pair) | goal ≥ 3× | our phases | numbers equal to |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for path in runs:
        d = json.loads(path.read_text())
        ref, ours = d["loop_summary"]["reference"], d["loop_summary"]["ours"]
        ratio = d["ratio_reference_over_ours"]["median"]
        worst = ref["min"] / ours["max"]
        share = ", ".join(f"{k} {v:.0%}" for k, v in d["our_phase_share"].items())
        worst_rel = max(n["rel_diff"] for n in d["numbers"])
        model = Path(d["model"]).name
        lines.append(
            f"| {model} ([{path.stem}.md]({path.stem}.md)) | {ref['median']:.2f} | {ours['median']:.2f} "
            f"| {ratio:.2f}× | {worst:.2f}× | {_met(ratio >= EVAL_GOAL)} | {share} | {worst_rel:.1e} |"
        )
    return [*lines, ""]


def startup_section(docs: Path) -> list[str]:
    d = _load(docs / "startup.json")
    lines = [
        "## Start-up ≤ 1.3× `import torch`",
        "",
        "`bench/startup.py` (`make bench-startup`): each stage's `--help` and the time before its first",
        'real work, alternating with `python -c "import torch"` in every round; medians.',
        "",
    ]
    if d is None:
        return [*lines, "Not measured.", ""]
    torch_row = next(r for r in d["rows"] if r["item"] == "import torch")
    rows = [r for r in d["rows"] if r is not torch_row]
    worst = max(rows, key=lambda r: r["ratio_vs_torch"])
    lines += [
        f"`import torch`: {torch_row['median_s']:.2f} s (the limit: 1.3 × that = {1.3 * torch_row['median_s']:.2f} s).",
        "",
        "| stage item | ours (s, median) | `import torch` (s) | ratio | goal ≤ 1.3× |",
        "|---|---:|---:|---:|---|",
        *[
            f"| {r['item']} | {r['median_s']:.2f} | {torch_row['median_s']:.2f} | {r['ratio_vs_torch']:.2f}× "
            f"| {_met(r['ratio_vs_torch'] <= STARTUP_GOAL)} |"
            for r in rows
        ],
        "",
        f"Worst: {worst['item']}, {worst['ratio_vs_torch']:.2f}×.",
        "",
    ]
    return lines


def train_section(docs: Path) -> list[str]:
    d = _load(docs / "train-throughput.json")
    lines = [
        "## Training ≥ 50 % of the matmul peak",
        "",
        "`bench/train_throughput.py` (`make bench-train`): a `grad_diff` + AdamW step (forget and retain",
        "passes) on a model built from config, FLOPs = 6 · parameters · tokens plus attention, against the",
        "best fp32 GEMM rate measured in the same process.",
        "",
    ]
    if d is None:
        return [*lines, "Not measured.", ""]
    s = d["shape"]
    lines += [
        "| model | step (s, median) | ours (GFLOP/s) | matmul peak (GFLOP/s) | ratio | goal ≥ 50 % |",
        "|---|---:|---:|---:|---:|---|",
        f"| hidden {s['hidden_size']} × {s['num_layers']} layers, {d['params'] / 1e6:.1f} M params, "
        f"{d['tokens']} tokens/pass | {d['step_s_median']:.2f} | {d['achieved_gflops']:.1f} "
        f"| {d['matmul']['peak']:.1f} | {d['mfu']:.0%} | {_met(d['mfu'] >= MFU_GOAL)} |",
        "",
    ]
    return lines


def repro_section(docs: Path) -> list[str]:
    d = _load(docs / "pipeline-benchmark.json")
    lines = [
        "## The default `dvc repro` ≤ 10 min",
        "",
        "`bench/stage_times.py` (`make bench`): a fresh clone of HEAD, one plain `dvc repro` (the",
        "README's command) timed from start to exit; each stage item from DVC's start of it to the next.",
        "Per item: [pipeline-benchmark.md](pipeline-benchmark.md).",
        "",
    ]
    if d is None:
        return [*lines, "Not measured.", ""]
    if d.get("mode") != "one dvc repro":
        # One `dvc repro --single-item` per item, before the attack items: not today's pipeline.
        return [*lines, "Not measured on the current pipeline (pipeline-benchmark.json is older).", ""]
    total = d["total_s"]
    lines += [
        "| run | ours (s) | limit (s) | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| default params, {len(d['stages'])} stage items | {total:.0f} | {REPRO_LIMIT_S:.0f} "
        f"| {total / REPRO_LIMIT_S:.2f} | {_met(total <= REPRO_LIMIT_S)} |",
        "",
        *_by_stage({r["stage"]: r["wall_s"] for r in d["stages"]}, total),
    ]
    return lines


def _by_stage(items: dict[str, float], total: float) -> list[str]:
    """Wall time per stage (the name before ``@``) from per-item seconds: items, sum, share of
    ``total``, and the per-item mean with its range."""
    per: dict[str, list[float]] = {}
    for name, sec in items.items():
        per.setdefault(name.split("@")[0], []).append(sec)
    return [
        "| stage | items | wall (s) | share | per item (s): mean, min–max |",
        "|---|---:|---:|---:|---|",
        *[
            f"| {k} | {len(v)} | {sum(v):.0f} | {sum(v) / total:.0%} "
            f"| {sum(v) / len(v):.0f}, {min(v):.0f}–{max(v):.0f} |"
            for k, v in per.items()
        ],
        "",
    ]


def progress_items(log: Path) -> tuple[dict[str, float], str | None, int]:
    """Per-item wall seconds from ``make study``'s progress lines (``[k/N] running item (M min
    elapsed …)``): each item runs until the next line. The last item's end is not in the log: it is
    returned apart (still running when the log ends), with the planned item count N."""
    marks: list[tuple[str, float]] = []
    planned = 0
    for line in log.read_text().splitlines():
        m = re.search(r"\[(\d+)/(\d+)\] running (\S+) \(([\d.]+) min elapsed", line)
        if m:
            planned = int(m.group(2))
            marks.append((m.group(3), float(m.group(4)) * 60))
    items = {name: t_next - t for (name, t), (_, t_next) in itertools.pairwise(marks)}
    return items, (marks[-1][0] if marks else None), planned


def partial_study_section(log: Path) -> list[str]:
    """The study's stages from the progress log of a run stopped before its end (0.1 min resolution)."""
    items, unfinished, planned = progress_items(log)
    done = sum(items.values())
    return [
        f"Measured from the progress lines of [{log.name}]({log.name}) (one idle run, stopped by hand at",
        f"{len(items)} finished items of {planned}, {done / 60:.1f} min; {unfinished} was running):",
        "",
        *_by_stage(items, done),
    ]


def study_section(docs: Path) -> list[str]:
    t = _load(docs / "robustness-study" / "default" / "timing.json")
    overlay = _load(docs / "robustness-study" / "default" / "params-overlay.json")
    lines = [
        "## The robustness study ≤ 60 min",
        "",
        "`make study` (`python bench/robustness_study.py`): a fresh repository, the study's matrix run",
        "by DVC with one progress line per stage item: one `dvc repro` (`--jobs 1`), or the upstream,",
        "then the models in `--jobs` shards of queued experiments side by side, then a `dvc repro` that",
        "restores them from the run cache (the default, `--jobs 2`). Wall time is from start to report.",
        "",
    ]
    logs = sorted(docs.glob("study-progress-*.log"))
    if t is None or overlay is None or "phases_s" not in t:
        # A timing.json without phases_s predates the attack items (one process per attack).
        if not logs:
            return [*lines, "Not measured.", ""]
        return [*lines, *partial_study_section(logs[-1])]
    pairs = overlay["unlearn.pairs"]
    methods = sorted({p["method"] for p in pairs})
    optimizers = list(dict.fromkeys(p["optimizer"] for p in pairs))
    seeds = overlay["unlearn.seeds"]
    total = t["wall_s"]
    # The goal is for the matrix: ≥ 3 methods × 4 optimizer grades × 4 attacks × 3 seeds.
    full = (
        len(methods) >= 3 and len(optimizers) >= 4 and len(seeds) >= 3 and len(overlay["attack.names"]) >= 4
    )
    lines += [
        f"Matrix: {len(methods)} methods ({', '.join(methods)}) × {len(optimizers)} optimizers "
        f"({', '.join(optimizers)}) × {len(seeds)} seeds = {len(pairs) * len(seeds)} unlearned models, each under "
        f"{len(overlay['attack.names'])} attacks ({', '.join(overlay['attack.names'])}); controls "
        f"({', '.join(overlay['attack.controls'])}) on the target and the oracle.",
        "",
        "| run | ours (s) | limit (s) | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| the study, {len(pairs) * len(seeds)} models | {total:.0f} | {STUDY_LIMIT_S:.0f} "
        f"| {total / STUDY_LIMIT_S:.2f} | {_met(total <= STUDY_LIMIT_S) if full else 'n/a: smaller than the issue’s matrix'} |",
        "",
    ]
    if "parts_s" in t:  # --jobs N: items ran side by side; their own run time, per stage, from MLflow
        lines += [
            "| part | wall (s) |",
            "|---|---:|",
            *[f"| {k} | {v:.0f} |" for k, v in t["parts_s"].items()],
            "",
            f"Item run time by stage ({t['jobs']} items at a time, so these add up to more than the wall):",
            "",
            "| stage | runs | run time (s) |",
            "|---|---:|---:|",
            *[f"| {k} | {v['runs']} | {v['run_s']:.0f} |" for k, v in t["item_run_s"].items()],
            "",
        ]
    else:
        lines += [
            "By stage:",
            "",
            "| stage | items | wall (s) | share | per item (s) |",
            "|---|---:|---:|---:|---:|",
            *[
                f"| {k} | {v['items']} | {v['wall_s']:.0f} | {v['wall_s'] / total:.0%} "
                f"| {v['wall_s'] / v['items']:.1f} |"
                for k, v in t["stages"].items()
            ],
            "",
        ]
    phases = t.get("phases_s") or {}
    if phases:
        inside = sum(phases.values())
        lines += [
            "Inside the `attack`, `attack_control` and `evaluate_base` items (their `info.json` seconds,",
            "summed): the rest of those items' time is process start-up, imports and DVC.",
            "",
            "| phase | seconds | share of the phases |",
            "|---|---:|---:|",
            *[
                f"| {k} | {v:.0f} | {v / inside:.0%} |"
                for k, v in sorted(phases.items(), key=lambda kv: -kv[1])
            ],
            "",
        ]
    return lines


def render(docs: Path) -> str:
    return "\n".join(
        [
            "# Throughput: issue 13's goals, measured",
            "",
            "Regenerate with `python bench/throughput_summary.py` after the bench scripts named below; each",
            "table is one run of its script on this machine kind (2 CPU cores, x86_64, no GPU, fp32), on an",
            "otherwise idle machine. These are timings, not training results: no metric claim rests on them.",
            "",
            *eval_section(docs),
            *startup_section(docs),
            *train_section(docs),
            *repro_section(docs),
            *study_section(docs),
            *cost_section(docs),
            *notes(docs),
        ]
    )


def cost_section(docs: Path) -> list[str]:
    """The cost breakdown's own table (imports, a finetune step, a decoding step), under this file's
    heading level."""
    lines = ["## Where a stage item's time goes", ""]
    path = docs / "cost-breakdown.md"
    if not path.is_file():
        return [*lines, "Not measured (`python bench/cost_breakdown.py --out docs/cost-breakdown.md`).", ""]
    body = path.read_text().splitlines()[1:]  # its own "# " title
    return [*lines, *body, ""]


def notes(docs: Path) -> list[str]:
    """The hand-written reading of the tables (where the time goes, what is next), kept apart so that
    regenerating the tables does not overwrite it."""
    path = docs / "throughput-notes.md"
    return [path.read_text().rstrip(), ""] if path.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "throughput.md")
    args = ap.parse_args()
    args.out.write_text(render(args.docs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
