"""Evaluation throughput of the full TOFU-format metric suite on the embedded model.

Usage: python bench/eval_throughput.py [--model models/target] [--splits data/splits]
                                       [--sizes 24 48 96] [--threads N] [--quick]
                                       [--out docs/eval-throughput.md]

Needs the prepared splits and a trained target (``dvc repro finetune@target``; ``make bench-eval``
runs both). For each size N, every split is capped at N rows (``evaluate.max_samples``; N = 0: every
row) and the whole suite of ``params.yaml``'s default metric list runs once, timed by phase (wall
and process CPU seconds): the batched scoring pass (``score_examples``), batched generation
(``generate_greedy``), the per-sample gradient norms of ``mia_grad_norm`` (``grad_norm_scores``),
and the rest (encoding, metric maths, AUCs, ROUGE). A forward hook counts the model's forward calls
and the tokens they carry per phase; the patched phase functions count the sequences scored and
the greedy answers decoded or read off the scoring pass. ``--quick``: one size (24), table printed,
nothing written.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(model, tok, data, layout, metrics, opts_kwargs, size: int) -> dict:
    from unlearnflow.metrics import SuiteOptions, evaluate_splits, relative_metrics, scored_split, suite

    phase = {"name": "other"}
    seconds: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    forwards: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)

    def timed(name, fn):
        def wrapped(*args, **kwargs):
            phase["name"] = name
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                cpu[name] += time.process_time() - start_cpu
                phase["name"] = "other"

        return wrapped

    def count(name, fn):
        signature = inspect.signature(fn)

        def wrapped(*args, **kwargs):
            call = signature.bind(*args, **kwargs).arguments
            if name == "score_examples":
                counts["scored"] += len(call["examples"])
            else:
                counts["answers"] += len(call["prompts"])
                counts["answers_read"] += sum(k is not None for k in call.get("known") or [])
            return fn(*args, **kwargs)

        return wrapped

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        forwards[phase["name"]] += 1
        tokens[phase["name"]] += int(ids.numel()) if ids is not None else 0

    # each phase's function, patched in the module that calls it
    where = {"score_examples": scored_split, "generate_greedy": scored_split, "grad_norm_scores": suite}
    originals = {n: getattr(module, n) for n, module in where.items()}
    for name, fn in originals.items():
        fn = count(name, fn) if name != "grad_norm_scores" else fn
        setattr(where[name], name, timed(name, fn))
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        opts = SuiteOptions(**{**opts_kwargs, "max_samples": size or None})
        start, start_cpu = time.perf_counter(), time.process_time()
        result = evaluate_splits(model, tok, data, layout, metrics=metrics, device="cpu", opts=opts)
        relative_metrics(result, layout, result.per_sample, metrics)
        total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        handle.remove()
        for name, fn in originals.items():
            setattr(where[name], name, fn)
    samples = sum(len(rows) for rows in result.per_sample.values())
    return {
        "max_samples": size,
        "samples": samples,
        "per_split": {k: len(v) for k, v in result.per_sample.items()},
        "seconds": round(total, 3),
        "cpu_seconds": round(total_cpu, 3),
        "samples_per_s": round(samples / total, 2),
        "phase_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "phase_cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "generation_share": round(seconds["generate_greedy"] / total, 3),
        "scoring_forwards": forwards["score_examples"],
        "scoring_tokens": tokens["score_examples"],
        "scored_sequences": counts["scored"],
        "scored_sequences_per_sample": round(counts["scored"] / samples, 2),
        "generation_forwards": forwards["generate_greedy"],
        "answers": counts["answers"],
        "answers_read_off_scoring": counts["answers_read"],
        "grad_norm_passes": forwards["grad_norm_scores"],
        "forwards_outside_phases": forwards["other"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "target")
    parser.add_argument("--splits", type=Path, default=ROOT / "data" / "splits")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 48, 96], help="rows per split; 0: all")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="size 24 only; print, write nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "eval-throughput.md")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [24]
    for path in (args.model, args.splits):
        if not path.exists():
            sys.exit(f"{path} not found: run `dvc repro finetune@target` first (or `make bench-eval`)")

    import torch

    from unlearnflow import modeling
    from unlearnflow.config import EvaluateConfig, ModelConfig, load_section
    from unlearnflow.data import splits as split_io

    torch.set_num_threads(max(1, args.threads))
    cfg = load_section(args.params, "evaluate", EvaluateConfig)
    model_cfg = load_section(args.params, "model", ModelConfig)
    tok = modeling.load_tokenizer(args.model)
    model = modeling.load_model(args.model)
    layout = split_io.read_layout(args.splits)
    data = split_io.read_splits(args.splits, layout.evaluated())
    opts = cfg.suite_options(model_cfg.max_length)
    measure(model, tok, data, layout, cfg.metrics, opts, 24)  # warm-up (first-call costs, lazy imports)
    rows = [measure(model, tok, data, layout, cfg.metrics, opts, n) for n in args.sizes]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads",
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "parameters": modeling.count_parameters(model),
        "metrics": cfg.metrics,
        "batch_size": cfg.batch_size,
        "peak_rss_mib": round(peak_mib, 1),
        "rows": rows,
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        args.out.write_text(render(record))
    print(render(record))


def render(record: dict) -> str:
    lines = [
        "# Evaluation throughput: the full TOFU-format suite on the embedded model",
        "",
        "Reproduce: `make bench-eval` (runs `dvc exp run -S finetune.epochs=40 finetune@target`, then",
        "`python bench/eval_throughput.py`). Numbers below are from one run on",
        f"{record['machine']}; model `{record['model']}` ({record['parameters']:,} parameters),",
        f"evaluate.batch_size {record['batch_size']}, every metric of the default list",
        f"({', '.join(record['metrics'])}). Peak RSS {record['peak_rss_mib']} MiB.",
        "",
        "Each size caps every split at N rows (`evaluate.max_samples`; 0: every row); a *sample* is one",
        "evaluated row of any split. *Scored sequences / sample* counts the (prompt, target) sequences",
        "of the one scoring call per split (a forget row carries its answer, paraphrase and 5 perturbed",
        "answers; an options row its answer and 3 wrong ones); scoring runs each distinct prompt once",
        "and continues it for every target that follows it, so its forwards carry fewer tokens than",
        "the sequences hold. Generation runs one forward per decoding step for a whole batch, only for",
        "the answers the scoring pass does not already show (a target predicted token by token up to",
        "EOS is the greedy answer). The gradient norms run per-sample gradients in vmapped batches.",
        "",
        "| N per split | samples | seconds | CPU s | samples/s | scoring forwards | scoring tokens "
        "| scored seqs / sample | answers read off scoring | generation forwards | grad-norm passes "
        "| generation share | scoring s | generation s | grad_norm s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        p = r["phase_seconds"]
        lines.append(
            f"| {r['max_samples'] or 'all'} | {r['samples']} | {r['seconds']} | {r['cpu_seconds']} "
            f"| {r['samples_per_s']} | {r['scoring_forwards']} | {r['scoring_tokens']:,} "
            f"| {r['scored_sequences_per_sample']} | {r['answers_read_off_scoring']} of {r['answers']} "
            f"| {r['generation_forwards']} | {r['grad_norm_passes']} | {r['generation_share']:.0%} "
            f"| {p.get('score_examples', 0)} | {p.get('generate_greedy', 0)} | {p.get('grad_norm_scores', 0)} |"
        )
    first, last = record["rows"][0], record["rows"][-1]
    per_seq = [
        1000 * r["phase_seconds"].get("score_examples", 0) / max(r["scored_sequences"], 1)
        for r in record["rows"]
    ]
    lines += [
        "",
        f"From N = {first['max_samples'] or 'all'} to {last['max_samples'] or 'all'} the sample count grows "
        f"{last['samples'] / first['samples']:.2f}× and the time {last['seconds'] / first['seconds']:.2f}×.",
        "Scoring costs " + ", ".join(f"{v:.2f}" for v in per_seq) + " ms per scored sequence at these sizes.",
        "`mia_grad_norm` only touches the member / non-member splits, whose size does not change here",
        "once N reaches it.",
        f"No forward pass runs outside the three phases ({last['forwards_outside_phases']} counted):",
        "no metric recomputes a pass another already did.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
