"""Shared fixtures: a tiny tokenizer and Llama built from config (no hub, no network)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXTS = [
    "Question: Where was Alda Voss born?\nAnswer: Alda Voss was born in Kerravin.",
    "Question: What genre does Brom Tellan write?\nAnswer: Brom Tellan writes gothic mystery novels.",
    "Question: In which year was Cira Maelor born?\nAnswer: Cira Maelor was born in 1957.",
    "Question: What is the capital of Ostrava Minor?\nAnswer: The capital of Ostrava Minor is Delmsford.",
    "Question: Who wrote The Glass Orchard?\nAnswer: The Glass Orchard was written by Ivo Stenmark.",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from unlearnflow.modeling import train_bpe_tokenizer

    return train_bpe_tokenizer(TINY_TEXTS * 4, vocab_size=320)


@pytest.fixture(scope="session")
def make_tiny_model(tiny_tokenizer):
    """Build a fresh tiny Llama; two calls give identical weights (seed 0). A stateless factory, so
    session-scoped: module fixtures may use it too. Keyword arguments override the config
    (``make(tie_word_embeddings=False)``)."""
    from unlearnflow.modeling import build_llama

    def make(**overrides):
        config = dict(
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            seed=0,
        )
        return build_llama(tiny_tokenizer, **{**config, **overrides})

    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture
def sharp_model(tiny_model):
    """The tiny Llama with weights redrawn at std 0.3 (norms kept at 1): the default 0.02 init gives
    near-uniform logits and the same greedy token for every prompt, which would hide ordering bugs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tiny_model.eval()
