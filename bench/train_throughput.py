"""Training throughput against the machine's own matmul peak: how close an unlearning step gets.

Usage: python bench/train_throughput.py [--config large] [--steps 6] [--warmup 2] [--out docs/train-throughput.md]

In one process and one run:

* **matmul peak**: the best GFLOP/s of ``torch.mm`` in fp32 over square sizes 1024–4096 and over
  the model's own GEMM shapes (tokens × hidden @ hidden × intermediate, …), each the best of
  several repeats: the limit the step is read against;
* **the step**: ``--method`` (grad_diff) with AdamW through the project's one training loop
  (``train.run``), on a Llama built from config (``large``: hidden 512, 8 layers, as in
  bench/method_step_cost.py), forget and retain batches of 16 rows × 64 tokens; median of
  ``--steps`` steps after ``--warmup``, from the loop's own per-step clock;
* **model FLOPs per step**: 6 · (matmul parameters, the LM head included) · tokens, for the forget
  and the retain pass, plus the attention products (12 · layers · seq · hidden per token);
* **where the time goes**: one step under ``torch.profiler``, CPU time by operator class (matmul,
  attention, softmax / cross-entropy, elementwise, optimizer, other).

MFU = model FLOPs per step / step time / matmul peak. Writes ``--out`` (.md and .json) when given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TQDM_DISABLE", "1")

from method_step_cost import ANSWER, BATCH, CONFIGS, PROMPT, ROWS, VOCAB, build_model, random_stream  # noqa: E402

SEQ = PROMPT + ANSWER


def mm_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """Best GFLOP/s of an fp32 ``(m×k) @ (k×n)`` over ``repeats`` timed products (after one warm-up)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def matmul_peak(shape: dict, tokens: int) -> dict:
    """The peak: best over square sizes and the model's GEMM shapes (forward and both backward GEMMs)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    square = {f"{s}³": mm_gflops(s, s, s, 5 if s < 4096 else 3) for s in (1024, 2048, 4096)}
    model = {}
    for name, (k, n) in {
        "attn proj": (h, h),
        "mlp up": (h, i),
        "mlp down": (i, h),
        "lm head": (h, VOCAB),
    }.items():
        model[f"{name} fwd {tokens}×{k}@{k}×{n}"] = mm_gflops(tokens, k, n, 10)
        model[f"{name} bwd-weight {k}×{tokens}@{tokens}×{n}"] = mm_gflops(k, tokens, n, 10)
    return {"square": square, "model_shapes": model, "peak": max([*square.values(), *model.values()])}


def model_flops(model, shape: dict, tokens_per_pass: int, passes: int) -> dict:
    """Training FLOPs of one step: 6·N·T for the matmul parameters N (LM head included, embeddings as a
    lookup excluded unless tied: a tied head is a matmul), plus attention's QKᵀ and AV products."""
    import torch

    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = tokens_per_pass * passes
    attention = 12 * shape["num_layers"] * SEQ * shape["hidden_size"] * tokens  # fwd 4·L·d, ×3 with bwd
    return {"matmul_params": matmul, "tokens": tokens, "flops": 6 * matmul * tokens + attention}


OP_CLASSES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "_flash_attention", "aten::_softmax_backward", "attention")),
    ("softmax / loss", ("log_softmax", "softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer", ("Optimizer.step", "_foreach", "adam", "lerp", "addcdiv")),
)


def profile_step(run_steps) -> dict[str, float]:
    """CPU self time (ms) of one training step by operator class, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps()
    classes: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        cls = next((c for c, keys in OP_CLASSES if any(k.lower() in name.lower() for k in keys)), "other")
        classes[cls] += event.self_cpu_time_total / 1e3
    return dict(classes)


def measure(args: argparse.Namespace) -> dict:
    import torch

    from unlearnflow import train
    from unlearnflow.config import TrainConfig
    from unlearnflow.methods import build_method

    torch.manual_seed(0)
    shape = CONFIGS[args.config]
    model = build_model(shape)
    gen = torch.Generator().manual_seed(0)
    data = {"forget": random_stream(gen), "retain": random_stream(gen), "idk": random_stream(gen)}
    method = build_method(args.method)
    passes = len(method.streams)

    def steps(n: int) -> list[float]:
        cfg = TrainConfig(epochs=n / (ROWS / BATCH), batch_size=BATCH, lr=1e-6, log_every=1)
        result = train.run(model, method, "adamw", data, cfg, pad_token_id=0, device=torch.device("cpu"))
        clock = [0.0] + [row["time"] for row in result.rows]
        return [b - a for a, b in itertools.pairwise(clock)]

    per_step = steps(args.warmup + args.steps)[args.warmup :]
    step_s = statistics.median(per_step)
    by_class = profile_step(lambda: steps(1))
    peak = matmul_peak(shape, BATCH * SEQ)
    flops = model_flops(model, shape, BATCH * SEQ, passes)
    achieved = flops["flops"] / step_s / 1e9
    return {
        "config": args.config,
        "shape": shape,
        "method": args.method,
        "optimizer": "adamw",
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "passes": passes,
        "step_s_median": step_s,
        "step_s_all": per_step,
        **flops,
        "achieved_gflops": achieved,
        "matmul": peak,
        "mfu": achieved / peak["peak"],
        "profile_ms": by_class,
    }


def write(r: dict, out: Path) -> None:
    total = sum(r["profile_ms"].values())
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({r['threads']} torch threads)"
    )
    lines = [
        "# Training throughput against the matmul peak",
        "",
        f"Reproduce: `.venv/bin/python bench/train_throughput.py {' '.join(sys.argv[1:])}`. One run, one "
        f"process; machine: {machine}, torch {__import__('torch').__version__}, fp32.",
        "",
        f"Model: Llama from config {r['shape']} ({r['params'] / 1e6:.1f} M parameters, "
        f"{r['matmul_params'] / 1e6:.1f} M in matmuls), {r['method']} + AdamW through `train.run`, "
        f"{r['passes']} passes (forget, retain) of {BATCH} × {SEQ} tokens per step.",
        "",
        "| goal | ours | limit | ratio |",
        "|---|---:|---:|---:|",
        f"| {r['method']} step ≥ 50 % of the matmul peak | {r['achieved_gflops']:.1f} GFLOP/s "
        f"({r['step_s_median'] * 1e3:.0f} ms/step, {r['flops'] / 1e9:.0f} GFLOP) | {r['matmul']['peak']:.1f} GFLOP/s "
        f"| **{r['mfu']:.0%}** |",
        "",
        "Matmul GFLOP/s measured in the same run (best of repeats):",
        "",
        "| product | GFLOP/s |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in {**r["matmul"]["square"], **r["matmul"]["model_shapes"]}.items()),
        "",
        "Where one step's CPU time goes (torch.profiler, self time by operator class):",
        "",
        "| class | ms | share |",
        "|---|---:|---:|",
        *(
            f"| {k} | {v:.0f} | {v / total:.0%} |"
            for k, v in sorted(r["profile_ms"].items(), key=lambda kv: -kv[1])
        ),
        "",
    ]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="large", choices=sorted(CONFIGS))
    ap.add_argument("--method", default="grad_diff")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    r = measure(args)
    print(
        f"{r['method']} {r['config']}: {r['step_s_median'] * 1e3:.0f} ms/step, {r['achieved_gflops']:.1f} GFLOP/s; "
        f"matmul peak {r['matmul']['peak']:.1f} GFLOP/s; MFU {r['mfu']:.1%}"
    )
    for k, v in sorted(r["profile_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} {v:8.0f} ms")
    if args.out:
        write(r, args.out)


if __name__ == "__main__":
    main()
