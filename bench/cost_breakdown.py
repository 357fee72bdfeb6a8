"""Where a stage item's time goes on the embedded default: imports, a finetune step, a decoding step.

Usage: python bench/cost_breakdown.py [--params params.yaml] [--steps 40] [--decode-steps 48]
                                      [--rounds 3] [--out docs/cost-breakdown.md]

The figures behind docs/throughput-notes.md, from one run of one command:

* **imports**: ``python -c "import torch"`` against ``import torch; from transformers import
  LlamaForCausalLM`` (what every model item pays before its first real work), alternating in each
  round; medians.
* **finetune step**: ``train.run`` (the one training loop, the ``sft`` method, AdamW, the
  ``finetune`` section's batch size) against a bare PyTorch loop (forward, cross-entropy, backward,
  clipping, AdamW) on batches of the same rows, both on a model of the ``model.scratch`` shape;
  milliseconds per step, and the share of padding tokens in a shuffled epoch against length-grouped
  batches (sorted by length, then cut into batches: the least padding any batching of these rows has).
* **decoding step**: ``model.generate`` (greedy, cache on, the evaluator's batch size) against a bare
  loop of cached forwards with argmax, against the matmul floor (2 · parameters FLOPs per row at
  the GEMM rate measured in the same run); milliseconds per step at the same batch.

Untrained weights: every figure is a timing, and only the shapes matter (decoding runs a fixed
number of steps). ``--out`` writes the Markdown and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = {
    "import torch": "import torch",
    "import torch + transformers' Llama": "import torch; from transformers import LlamaForCausalLM",
}


def time_imports(rounds: int) -> dict[str, float]:
    """Median seconds of each IMPORTS snippet in a fresh interpreter, the snippets alternating."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    times: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(rounds + 1):  # the first round warms the page cache and is dropped
        for name, code in IMPORTS.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def training_rows(params: Path) -> tuple[Any, Any, list[dict[str, list[int]]], Any]:
    """The target's training rows of the params' benchmark, its tokenizer and the two configs."""
    from unlearnflow import modeling
    from unlearnflow.config import BenchmarkConfig, FinetuneConfig, ModelConfig, load_section
    from unlearnflow.data import splits as split_io
    from unlearnflow.data.loaders import build_benchmark
    from unlearnflow.data.tokenize import PromptFormat, training_examples

    bench = load_section(params, "benchmark", BenchmarkConfig)
    model_cfg = load_section(params, "model", ModelConfig)
    data = build_benchmark(bench)
    with tempfile.TemporaryDirectory(prefix="unlearnflow-costs-") as tmp:
        split_io.write_splits(data, Path(tmp) / "splits", meta={"benchmark": bench.model_dump()})
        layout = split_io.read_layout(Path(tmp) / "splits")
        splits = split_io.read_splits(Path(tmp) / "splits")
    tok = modeling.train_bpe_tokenizer(split_io.corpus_texts(splits, layout), model_cfg.scratch.vocab_size)
    rows = [
        ex
        for name in layout.train["target"]
        for ex in training_examples(
            tok,
            splits[name],
            layout.info[name].kind,
            max_length=model_cfg.max_length,
            fmt=PromptFormat(**model_cfg.prompt_kwargs()),
            split=name,
        )
    ]
    return tok, model_cfg, rows, load_section(params, "finetune", FinetuneConfig)


def pad_shares(rows: list[dict[str, list[int]]], batch_size: int, seed: int) -> dict[str, float]:
    """Padding share of all tokens in one shuffled epoch (the loop's sampler) and length-grouped."""
    import torch

    lengths = [len(r["input_ids"]) for r in rows]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()

    def share(order: list[int]) -> float:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    return {
        "shuffled": share(order),
        "length_grouped": share(sorted(range(len(rows)), key=lengths.__getitem__)),
    }


def finetune_step_ms(tok: Any, model_cfg: Any, rows: list, cfg: Any, steps: int) -> dict[str, float]:
    """Milliseconds per optimizer step: the project's loop and a bare loop on the same batches."""
    import torch

    from unlearnflow import modeling, train
    from unlearnflow.data.tokenize import collate
    from unlearnflow.methods import build_method

    model = modeling.build_scratch(tok, model_cfg, seed=0)
    start = time.perf_counter()
    train.run(
        model,
        build_method("sft", key="finetune"),
        "adamw",
        {"train": rows},
        cfg,
        pad_token_id=tok.pad_token_id,
        device=torch.device("cpu"),
        max_steps=steps,
        desc="finetune (ours)",
    )
    ours = (time.perf_counter() - start) / steps

    model = modeling.build_scratch(tok, model_cfg, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [
        collate(
            [rows[j] for j in torch.randperm(len(rows), generator=gen)[: cfg.batch_size].tolist()],
            tok.pad_token_id,
        )
        for _ in range(steps)
    ]
    start = time.perf_counter()
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
    bare = (time.perf_counter() - start) / steps
    return {"ours_ms": 1000 * ours, "bare_ms": 1000 * bare}


def gemm_gflops(n: int = 512, repeats: int = 20) -> float:
    """Best fp32 GEMM rate of this process (n × n × n), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def decode_step_ms(tok: Any, model_cfg: Any, rows: list, batch_size: int, steps: int) -> dict[str, float]:
    """Milliseconds per decoding step at ``batch_size`` rows: ``generate``, a bare cached loop, the floor."""
    import torch
    from transformers import DynamicCache

    from unlearnflow import modeling
    from unlearnflow.data.tokenize import collate_left

    model = modeling.build_scratch(tok, model_cfg, seed=0).eval()
    prompts = []
    for r in rows[:batch_size]:
        first_label = next(i for i, y in enumerate(r["labels"]) if y != -100)
        prompts.append(r["input_ids"][:first_label])
    batch = collate_left(prompts, tok.pad_token_id)
    # no row may stop early: an EOS id outside the vocabulary never comes up
    no_eos = model.config.vocab_size + 1
    with torch.inference_mode():
        model.generate(
            **batch, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=no_eos
        )
        start = time.perf_counter()
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=steps, pad_token_id=tok.pad_token_id, eos_token_id=no_eos
        )
        generate = (time.perf_counter() - start) / (out.shape[1] - batch["input_ids"].shape[1])

        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        start = time.perf_counter()
        cache = DynamicCache()
        logits = model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, past_key_values=cache
        ).logits[:, -1]
        for _ in range(steps - 1):
            nxt = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(
                input_ids=nxt, attention_mask=mask, position_ids=positions, past_key_values=cache
            ).logits[:, -1]
        bare = (time.perf_counter() - start) / steps
    floor = 2 * modeling.count_parameters(model) * batch_size / (gemm_gflops() * 1e9)
    return {"generate_ms": 1000 * generate, "bare_ms": 1000 * bare, "matmul_floor_ms": 1000 * floor}


def render(r: dict[str, Any]) -> str:
    imp, ft, dec, pad = r["imports_s"], r["finetune"], r["decode"], r["padding"]
    torch_s = imp["import torch"]
    lines = [
        "# Cost breakdown of a stage item on the embedded default",
        "",
        f"`{r['command']}`, one run on {r['machine']} (threads: {r['threads']}); timings only.",
        "",
        "| what | seconds or ms | against | ratio |",
        "|---|---:|---|---:|",
    ]
    for name, s in imp.items():
        lines.append(f"| `{name}` | {s:.2f} s | `import torch` | {s / torch_s:.2f}× |")
    lines += [
        f"| finetune step, ours (`train.run`, batch {r['batch_size']}) | {ft['ours_ms']:.0f} ms | bare loop"
        f" {ft['bare_ms']:.0f} ms | {ft['ours_ms'] / ft['bare_ms']:.2f}× |",
        f"| padding share of a shuffled epoch | {pad['shuffled']:.0%} | length-grouped batches {pad['length_grouped']:.0%} | |",
        f"| decoding step, `generate` (batch {r['eval_batch_size']}) | {dec['generate_ms']:.1f} ms | bare cached"
        f" loop {dec['bare_ms']:.1f} ms | {dec['generate_ms'] / dec['bare_ms']:.2f}× |",
        f"| decoding step, bare cached loop | {dec['bare_ms']:.1f} ms | matmul floor {dec['matmul_floor_ms']:.2f} ms"
        f" | {dec['bare_ms'] / dec['matmul_floor_ms']:.0f}× |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--steps", type=int, default=40, help="finetune steps timed per loop")
    parser.add_argument("--decode-steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="import rounds (after one warm-up)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write this Markdown file and a .json beside it"
    )
    args = parser.parse_args()

    imports = time_imports(args.rounds)
    import torch

    from unlearnflow.config import EvaluateConfig, load_section

    tok, model_cfg, rows, ft_cfg = training_rows(args.params)
    eval_batch = load_section(args.params, "evaluate", EvaluateConfig).batch_size
    record = {
        "command": "python bench/cost_breakdown.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "threads": torch.get_num_threads(),
        "batch_size": ft_cfg.batch_size,
        "eval_batch_size": eval_batch,
        "rows": len(rows),
        "imports_s": imports,
        "padding": pad_shares(rows, ft_cfg.batch_size, ft_cfg.seed),
        "finetune": finetune_step_ms(tok, model_cfg, rows, ft_cfg, args.steps),
        "decode": decode_step_ms(tok, model_cfg, rows, eval_batch, args.decode_steps),
    }
    text = render(record)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
