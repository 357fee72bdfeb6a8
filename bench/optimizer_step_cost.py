"""Time and peak memory per optimizer step of every optimizer, against a forward-only pass and AdamW.

Usage: python bench/optimizer_step_cost.py [--out docs/optimizer-step-cost.md] [--steps 6] [--warmup 2]
       [--optimizers adamw,zo_sgd,…] [--configs embedded,large]

Every optimizer runs grad_diff (forget + retain batches) on the same model and batch shapes through
the one training loop (``train.run``), each in a fresh process, so that its peak memory is its own:

* time per step: median over ``--steps`` timed optimizer steps (after ``--warmup``) of the loop's
  per-step clock (every closure evaluation, backward if any, the update);
* peak RSS: the process's peak resident set (``ru_maxrss``), the issue's measure, and the same minus
  the resident set before training (weights already loaded: optimizer state, gradients, activations).

The references run in the same invocation: ``forward`` evaluates the same objective under
``torch.no_grad`` once per step (no optimizer: inference level) and ``adamw`` is the first-order
step. ``embedded`` is the default pipeline's model (hidden 128, 4 layers); ``large`` a config-built
one (hidden 1024, 8 layers, ~100 M parameters), at batch 8 to keep the run short on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from method_step_cost import ANSWER, PROMPT, ROWS, build_model, random_stream, rss_mib, run_worker  # noqa: E402

CONFIGS = {
    "embedded": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512, "batch": 16},
    "large": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "intermediate_size": 4096, "batch": 8},
}


def worker(optimizer: str, config: str, steps: int, warmup: int, threads: int) -> dict:
    """Run ``warmup + steps`` steps of grad_diff × ``optimizer`` (or forward passes) and measure them."""
    import torch

    from unlearnflow import train
    from unlearnflow.config import TrainConfig
    from unlearnflow.data.tokenize import collate
    from unlearnflow.methods import build_method

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    c = CONFIGS[config]
    model = build_model(c)
    gen = torch.Generator().manual_seed(0)
    data = {"forget": random_stream(gen), "retain": random_stream(gen)}
    algo = build_method("grad_diff", {})
    batch = c["batch"]
    before = rss_mib()
    if optimizer == "forward":
        model.eval()
        times = []
        with torch.no_grad():
            for i in range(steps + warmup):
                sub = {s: collate(data[s][i * batch % ROWS :][:batch], 0) for s in data}
                mb = {s: v | {"token_weight": 1.0, "seq_weight": 1.0} for s, v in sub.items()}
                start = time.perf_counter()
                algo.loss(model, mb)
                times.append(time.perf_counter() - start)
        per_step = times[warmup:]
    else:
        cfg = TrainConfig(epochs=(steps + warmup) / (ROWS / batch), batch_size=batch, lr=1e-7, log_every=1)
        result = train.run(
            model, algo, optimizer, data, cfg, pad_token_id=0, device=torch.device("cpu"), desc=optimizer
        )
        clock = [0.0] + [row["time"] for row in result.rows]
        per_step = [b - a for a, b in itertools.pairwise(clock)][warmup:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "optimizer": optimizer,
        "config": config,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "steps_timed": len(per_step),
        "step_s_median": statistics.median(per_step),
        "peak_rss_mib": peak,
        "peak_extra_mib": max(0.0, peak - before),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "optimizer-step-cost.md")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optimizers", default=None, help="comma-separated; default: every optimizer")
    ap.add_argument("--configs", default="embedded,large")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker")
    ap.add_argument("--worker", nargs=2, metavar=("OPTIMIZER", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.threads)))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from unlearnflow.optim import OPTIMIZERS

    names = args.optimizers.split(",") if args.optimizers else list(OPTIMIZERS)
    names = ["forward", "adamw", *(n for n in names if n not in ("forward", "adamw"))]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TQDM_DISABLE="1")
    results = []
    for config in args.configs.split(","):
        for name in names:
            start = time.perf_counter()
            flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            r = run_worker(__file__, [name, config, *flags], env)
            results.append(r)
            print(
                f"{config:9s} {name:10s} {r['step_s_median'] * 1e3:9.1f} ms/step  peak {r['peak_rss_mib']:7.0f} MiB "
                f"(+{r['peak_extra_mib']:.0f}) ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    write(results, args)


def write(results: list[dict], args: argparse.Namespace) -> None:
    ref = {(r["config"], r["optimizer"]): r for r in results if r["optimizer"] in ("forward", "adamw")}
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({args.threads} torch "
        f"threads per worker), Python {platform.python_version()}"
    )
    lines = [
        "# Step cost of every optimizer",
        "",
        f"Reproduce: `.venv/bin/python {' '.join(['bench/optimizer_step_cost.py', *sys.argv[1:]])}` "
        "(writes this file and its JSON).",
        f"Machine: {machine}. grad_diff (a forget and a retain batch, prompt {PROMPT} + answer {ANSWER} "
        f"tokens), median of {args.steps} optimizer steps after {args.warmup} warm-up steps, each optimizer "
        "in a fresh process. `forward`: the same objective evaluated once under no_grad, no optimizer "
        "(inference level). Peak RSS is the whole process (Python, torch, the weights); 'extra' is the "
        "peak minus the resident set just before training (optimizer state, gradients, activations).",
        "",
    ]
    for config in dict.fromkeys(r["config"] for r in results):
        rows = [r for r in results if r["config"] == config]
        fwd, adamw = ref[(config, "forward")], ref[(config, "adamw")]
        c = {k: v for k, v in CONFIGS[config].items() if k != "batch"}
        lines += [
            f"## {config} ({c}, {rows[0]['params'] / 1e6:.1f} M parameters, batch {rows[0]['batch']})",
            "",
            "| optimizer | ms / step | × adamw step | peak RSS MiB | × forward | extra MiB | extra × forward |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            extra = r["peak_extra_mib"] / fwd["peak_extra_mib"] if fwd["peak_extra_mib"] else float("nan")
            lines.append(
                f"| {r['optimizer']} | {r['step_s_median'] * 1e3:.1f} | "
                f"{r['step_s_median'] / adamw['step_s_median']:.2f} | {r['peak_rss_mib']:.0f} | "
                f"{r['peak_rss_mib'] / fwd['peak_rss_mib']:.2f} | {r['peak_extra_mib']:.0f} | {extra:.2f} |"
            )
        lines.append("")
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
