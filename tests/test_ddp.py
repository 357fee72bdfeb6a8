"""Data parallelism on CPU (two processes, gloo): replicas stay identical under every optimizer kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def launch(optimizer: str, out: Path, reduce: str = "on") -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(HERE / "ddp_worker.py"), optimizer, str(out), reduce]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("optimizer", ["adamw", "zo_adam", "fo_zo", "fo_rs", "sophia"])
def test_replicas_stay_identical(optimizer, tmp_path):
    """Two processes, each with its own rows (accelerate shards the loader), three epochs at batch 1:
    first-order steps average gradients (DDP), zeroth-order steps draw the same directions on both
    ranks and average the projected differences, fo_rs perturbs identically, sophia's GNB probe is
    averaged like a gradient. The final parameters are equal bit for bit on both ranks, and moved."""
    launch(optimizer, tmp_path)
    a, b = (load_file(tmp_path / f"{optimizer}-rank{r}.safetensors")["flat"] for r in (0, 1))
    meta = json.loads((tmp_path / f"{optimizer}-rank0.json").read_text())
    assert meta["world"] == 2 and len(meta["rows"]) >= 2
    assert torch.equal(a, b)


def test_without_averaging_zo_replicas_drift(tmp_path):
    """The control: with the projected differences left un-averaged, the ranks' different rows give
    different ZO updates and the replicas drift apart (so the test above can fail)."""
    launch("zo_adam", tmp_path, reduce="off")
    a, b = (load_file(tmp_path / f"zo_adam-rank{r}.safetensors")["flat"] for r in (0, 1))
    assert not torch.equal(a, b)
