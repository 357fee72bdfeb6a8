"""Time and peak memory per optimizer step of every unlearning method, relative to grad_diff.

Usage: python bench/method_step_cost.py [--out docs/method-step-cost.md] [--steps 8] [--warmup 2]
       [--methods pdu,ofmu,…] [--configs embedded,large]

A method may carry argument overrides, ``name:key=value:key=value`` (values parsed as YAML), e.g.
``ofmu:hvp=finite_diff:fd_scheme=forward``; ``make bench-ofmu`` compares OFMU's settings that way.

Every method runs the same model and the same batch shapes through the one training loop
(``train.run``, AdamW, batch 16, prompt 40 + answer 24 tokens, forget/retain/idk streams of random
tokens), each in its own process so that peak memory is that method's alone:

* time per step: the median over ``--steps`` timed optimizer steps (after ``--warmup`` untimed ones)
  of the loop's own per-step clock (forward, backward, the method's extra passes, optimizer step);
* peak memory: the process's peak resident set during training minus its resident set just before
  (so optimizer state, π_ref copies and activations count; the model's own weights do not).

``embedded`` is the default pipeline's scratch model (hidden 128, 4 layers, vocab 1024); ``large`` a
config-built one (hidden 512, 8 layers). Ratios are against grad_diff measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "embedded": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512},
    "large": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048},
}
VOCAB, PROMPT, ANSWER, ROWS, BATCH = 1024, 40, 24, 64, 16


def rss_mib() -> float:
    """This process's resident set now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(shape: dict, *, vocab: int = VOCAB, positions: int = PROMPT + ANSWER):
    """A Llama built from config (no hub): ``shape`` holds hidden_size, num_layers, num_heads, intermediate_size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            num_key_value_heads=shape["num_heads"],
            num_attention_heads=shape["num_heads"],
            hidden_size=shape["hidden_size"],
            intermediate_size=shape["intermediate_size"],
            num_hidden_layers=shape["num_layers"],
            max_position_embeddings=positions,
            tie_word_embeddings=True,
        )
    )


def random_stream(gen, rows: int = ROWS) -> list[dict[str, list[int]]]:
    """``rows`` random prompt + answer examples (labels on the answer only), drawn from ``gen``."""
    import torch

    ids = torch.randint(3, VOCAB, (rows, PROMPT + ANSWER), generator=gen).tolist()
    return [{"input_ids": r, "labels": [-100] * PROMPT + r[PROMPT:]} for r in ids]


def run_worker(script: str, args: list[str], env: dict[str, str]) -> dict:
    """Run ``script --worker …`` in a fresh process and return the JSON record it prints last."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(method: str, config: str, steps: int, warmup: int, threads: int) -> dict:
    """Run ``warmup + steps`` optimizer steps of ``method`` in this process and measure them."""
    import torch
    import yaml

    from unlearnflow import train
    from unlearnflow.config import TrainConfig
    from unlearnflow.methods import build_method

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(CONFIGS[config])
    gen = torch.Generator().manual_seed(0)
    forget = random_stream(gen)
    data = {"forget": forget, "retain": random_stream(gen), "idk": random_stream(gen), "train": forget}
    name, *pairs = method.split(":")
    overrides = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in pairs)}
    algo = build_method(name, overrides)
    # Batches per epoch = ROWS / BATCH: enough epochs for warmup + timed steps; lr tiny so nothing diverges.
    cfg = TrainConfig(epochs=(steps + warmup) / (ROWS / BATCH), batch_size=BATCH, lr=1e-6, log_every=1)
    before = rss_mib()
    result = train.run(
        model, algo, "adamw", data, cfg, pad_token_id=0, device=torch.device("cpu"), desc=method
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    clock = [0.0] + [row["time"] for row in result.rows]
    per_step = [b - a for a, b in itertools.pairwise(clock)][warmup:]
    return {
        "method": method,
        "config": config,
        "params": sum(p.numel() for p in model.parameters()),
        "steps_timed": len(per_step),
        "step_s_median": statistics.median(per_step),
        "step_s_min": min(per_step),
        "peak_extra_mib": max(0.0, peak - before),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "method-step-cost.md")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default=None, help="comma-separated; default: every unlearning method")
    ap.add_argument("--configs", default="embedded,large")
    ap.add_argument("--title", default="Step cost of every unlearning method")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.threads)))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from unlearnflow.matrix import NOT_UNLEARNING
    from unlearnflow.methods import METHODS

    methods = args.methods.split(",") if args.methods else sorted(set(METHODS) - NOT_UNLEARNING)
    if "grad_diff" not in methods:
        methods.insert(0, "grad_diff")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TQDM_DISABLE="1")
    results = []
    for config in args.configs.split(","):
        for method in methods:
            start = time.perf_counter()
            flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            results.append(run_worker(__file__, [method, config, *flags], env))
            r = results[-1]
            print(
                f"{config:9s} {method:40s} {r['step_s_median'] * 1e3:8.1f} ms/step "
                f"{r['peak_extra_mib']:8.1f} MiB ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    write(results, args)


def write(results: list[dict], args: argparse.Namespace) -> None:
    base = {r["config"]: r for r in results if r["method"] == "grad_diff"}
    for r in results:
        ref = base[r["config"]]
        r["time_ratio"] = r["step_s_median"] / ref["step_s_median"]
        r["memory_ratio"] = r["peak_extra_mib"] / ref["peak_extra_mib"] if ref["peak_extra_mib"] else None
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({args.threads} torch "
        f"threads per worker), Python {platform.python_version()}"
    )
    lines = [
        f"# {args.title}",
        "",
        f"Reproduce: `.venv/bin/python {' '.join(['bench/method_step_cost.py', *sys.argv[1:]])}` "
        "(writes this file and its JSON).",
        f"Machine: {machine}. Batch {BATCH} (forget, retain and idk streams each), prompt {PROMPT} + answer "
        f"{ANSWER} tokens, AdamW, median of {args.steps} optimizer steps after {args.warmup} warm-up steps; "
        "peak memory = the process's peak RSS during training minus its RSS before (optimizer state, "
        "reference copies and activations; not the model's own weights). Ratios against grad_diff in the same run.",
        "",
    ]
    for config in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == config]
        lines += [
            f"## {config} ({CONFIGS[config]}, {rows[0]['params'] / 1e6:.1f} M parameters)",
            "",
            "| method | ms / step (median) | × grad_diff | peak extra MiB | × grad_diff |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: r["time_ratio"]):
            mem = "–" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
            lines.append(
                f"| {r['method']} | {r['step_s_median'] * 1e3:.1f} | {r['time_ratio']:.2f} "
                f"| {r['peak_extra_mib']:.0f} | {mem} |"
            )
        lines.append("")
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
