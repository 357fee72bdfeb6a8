"""Run by tests/test_ddp.py under ``torchrun --nproc_per_node 2``: train with one optimizer, save this
rank's final parameters and step rows. Each rank sees different rows (accelerate shards the loader)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_TEXTS
from helpers import FORGET, RETAIN, encode

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.methods import build_method
from unlearnflow.modeling import build_llama, train_bpe_tokenizer


def main(optimizer: str, out: Path, reduce: str) -> None:
    tok = train_bpe_tokenizer(TINY_TEXTS * 4, vocab_size=320)
    model = build_llama(
        tok,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        seed=0,
    )
    if reduce == "off":  # the failure this test exists for: replicas that do not average
        train._all_reduce_tensor = lambda accelerator, t: t
    data = {"forget": encode(tok, FORGET), "retain": encode(tok, RETAIN)}
    cfg = TrainConfig(epochs=3, batch_size=1, lr=1e-2, seed=0)
    result = train.run(
        model,
        build_method("grad_diff"),
        optimizer,
        data,
        cfg,
        pad_token_id=tok.pad_token_id,
        device=torch.device("cpu"),
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    save_file({"flat": flat}, out / f"{optimizer}-rank{rank}.safetensors")
    (out / f"{optimizer}-rank{rank}.json").write_text(json.dumps({"world": world, "rows": result.rows}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "on")
