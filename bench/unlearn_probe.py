"""Probe one method × optimizer on a trained target over seeds: forget / retain answer probability.

Usage: python bench/unlearn_probe.py --method grad_diff --optimizer signadam [--seeds 0,1,2]
       [--lr 2e-4] [--epochs 5] [--optimizer-args '{"zo_lr": 1e-4}'] [--model models/target]
       [--splits data/splits] [--params params.yaml] [--attack quantize_4bit ...]

The learning-rate probe behind docs/optimizers.md: the unlearn stage's training (same loop, same
params.yaml sections; ``--lr`` / ``--epochs`` / ``--optimizer-args`` override them) without the stage's
outputs or the full evaluation, so a sweep point costs the training alone. Prints one JSON line per
seed and the mean ± sd. Needs a pipeline's ``models/target`` and ``data/splits``: the docs' numbers are on
the 40-epoch target (``dvc exp run -S finetune.epochs=40 finetune``; the default's has 20).
Each row also has the unlearning's weight change from the target (``weights.weight_change``) and,
per ``--attack`` (a weight-only attack of ``attack.names``: quantize, noise), the probabilities
after it: the probe that places a learning rate in or out of the regime a quantization can undo.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from unlearnflow import modeling, train
from unlearnflow.attacks import AttackContext, build_attack
from unlearnflow.config import AttackConfig, ModelConfig, UnlearnConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.data.refusals import idk_rows
from unlearnflow.data.tokenize import collate, training_examples
from unlearnflow.losses import sequence_nll
from unlearnflow.matrix import check_pair, item_config
from unlearnflow.methods import build_method
from unlearnflow.weights import weight_change


def answer_prob(model: torch.nn.Module, examples: list, pad_id: int) -> float:
    """Mean over examples of the per-token geometric-mean probability of the answer."""
    probs: list[float] = []
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            b = collate(examples[i : i + 64], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            seq, n = sequence_nll(logits, b["labels"])
            probs += torch.exp(-seq / n).tolist()
    return sum(probs) / len(probs)


def probe(args: argparse.Namespace, seed: int) -> dict:
    cfg = load_section(args.params, "unlearn", UnlearnConfig).with_seed(seed)
    if args.optimizer_args:
        merged = {**cfg.optimizer_args.get(args.optimizer, {}), **json.loads(args.optimizer_args)}
        cfg = cfg.model_copy(update={"optimizer_args": {**cfg.optimizer_args, args.optimizer: merged}})
    cfg, _ = item_config(cfg, args.method, args.optimizer)
    cfg = cfg.model_copy(
        update={k: v for k, v in (("lr", args.lr), ("epochs", args.epochs)) if v is not None}
    )
    check_pair(cfg, args.method, args.optimizer)
    model_cfg = load_section(args.params, "model", ModelConfig)
    tok = modeling.load_tokenizer(args.model)
    net = modeling.load_model(args.model)
    algo = build_method(args.method, cfg.method_args.get(args.method))
    layout = split_io.read_layout(args.splits)
    data = split_io.read_splits(args.splits, [layout.unlearn["forget"], layout.unlearn["retain"]])
    forget, retain = data[layout.unlearn["forget"]], data[layout.unlearn["retain"]]
    kind = layout.info[layout.unlearn["forget"]].kind
    enc = {
        "forget": training_examples(tok, forget, kind, max_length=model_cfg.max_length, split="forget"),
        "retain": training_examples(tok, retain, kind, max_length=model_cfg.max_length, split="retain"),
    }
    refusals = idk_rows(forget, kind, seed=seed, method=args.method, split="forget")
    enc["idk"] = training_examples(tok, refusals, "qa", max_length=model_cfg.max_length, split="idk")
    start = time.time()
    result = train.run(
        net,
        algo,
        args.optimizer,
        {s: enc[s] for s in algo.streams},
        cfg,
        pad_token_id=tok.pad_token_id,
        device=torch.device("cpu"),
        optimizer_args=cfg.optimizer_args.get(args.optimizer),
        desc=f"{args.method}×{args.optimizer}",
    )
    net.eval()
    row = {
        "method": args.method,
        "optimizer": args.optimizer,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "seed": seed,
        "steps": result.steps,
        "forget_prob": round(answer_prob(net, enc["forget"], tok.pad_token_id), 4),
        "retain_prob": round(answer_prob(net, enc["retain"][::4], tok.pad_token_id), 4),
        "health": result.health,
        "wall_s": round(time.time() - start, 1),
    }
    row |= {f"weight_{k}": round(v, 5) for k, v in weight_change(net, args.model).items()}
    attacks = load_section(args.params, "attack", AttackConfig)
    for name in args.attack:
        attacked = copy.deepcopy(net)
        build_attack(name, attacks).apply(attacked, AttackContext(tokenizer=tok))
        row[f"{name}_forget_prob"] = round(answer_prob(attacked, enc["forget"], tok.pad_token_id), 4)
        row[f"{name}_retain_prob"] = round(answer_prob(attacked, enc["retain"][::4], tok.pad_token_id), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--optimizer", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=None, help="override the item's lr")
    ap.add_argument("--epochs", type=float, default=None, help="override the item's epochs")
    ap.add_argument("--optimizer-args", default=None, help="JSON merged into the optimizer's section")
    ap.add_argument("--model", type=Path, default=Path("models/target"))
    ap.add_argument("--splits", type=Path, default=Path("data/splits"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument(
        "--attack", action="append", default=[], help="an attack.names section to apply after (weights only)"
    )
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(probe(args, seed))
        print(json.dumps(rows[-1]), flush=True)
    for key in ["forget_prob", "retain_prob", "weight_q4_code_change"] + [
        f"{a}_{k}" for a in args.attack for k in ("forget_prob", "retain_prob")
    ]:
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{key}: {statistics.mean(values):.3f} ± {sd:.3f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
