"""The quantize attack: bnb and round-to-nearest grids, the layers it touches, and what it computes."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unlearnflow.attacks.quantize  # noqa: F401  (registers "quantize")
from unlearnflow.attacks import AttackContext, build_attack
from unlearnflow.attacks.quantize import (
    bnb_quantize_4bit,
    bnb_quantize_8bit,
    quantizable_linears,
    quantize_model,
    rtn_quantize,
)
from unlearnflow.config import AttackConfig, QuantizeAttackConfig, parse_section
from unlearnflow.errors import ConfigError, UnlearnflowError

# bitsandbytes is a dependency of the bnb backend only: without it the rtn tests still run.
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")

FP4, NF4 = QuantizeAttackConfig(quant_type="fp4"), QuantizeAttackConfig(quant_type="nf4")
CONFIGS = {
    "bnb-fp4": FP4,
    "bnb-nf4": NF4,
    "bnb-int8": QuantizeAttackConfig(bits=8),
    "rtn-4-g16": QuantizeAttackConfig(backend="rtn", bits=4, group_size=16),
    "rtn-8-row": QuantizeAttackConfig(backend="rtn", bits=8, group_size=None),
}


def names(*keys: str) -> list:
    """CONFIGS keys as parameters, the bnb ones marked ``needs_bnb``."""
    return [pytest.param(k, marks=needs_bnb) if k.startswith("bnb") else k for k in keys]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def code_book(quant_type: str) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    return bnb_f.get_4bit_type(quant_type, device="cpu")


# --- bnb 4 bit -----------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_bnb_linear4bit_computes_with_the_dequantized_weights(quant_type):
    """``bnb.nn.Linear4bit`` on CPU dequantizes its weight and runs F.linear, so its output must be
    F.linear with the weights the attack writes. Tolerance: float rounding of one fp32 matmul
    (rtol 1e-6; on this path the outputs are in fact bitwise equal). 80 inputs is no multiple of
    the 64-weight block, so blocks straddle rows, as in bnb."""
    import bitsandbytes as bnb

    lin = nn.Linear(80, 48)
    layer = bnb.nn.Linear4bit(80, 48, compress_statistics=False, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        lin.weight.detach().clone(),
        blocksize=64,
        compress_statistics=False,
        quant_type=quant_type,
        module=layer,
    )
    layer.bias = nn.Parameter(lin.bias.detach().clone())
    layer = layer.to("cpu").eval()  # .to(device) is where Params4bit quantizes
    # CPUs with AVX512-BF16 repack the weight and compute in bf16 at inference: take the generic path.
    layer.support_avx512bf16_for_cpu = False
    stats = quantize_model(nn.Sequential(lin), QuantizeAttackConfig(quant_type=quant_type, blocksize=64))
    x = torch.randn(2, 5, 80)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-6, atol=1e-7)
    assert stats["quantized_layers"] == 1.0 and stats["quant_rel_change"] > 0.05


@needs_bnb
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_bnb_4bit_blocks_take_at_most_16_values_the_nearest_codes(quant_type):
    """Flattened into blocks of 64 (the last one shorter: 7·30 = 3·64 + 18), each block of ŵ is
    absmax_block · c with c the code-book value nearest to w / absmax_block: ≤ 16 distinct values."""
    w = torch.randn(7, 30)
    w_hat = bnb_quantize_4bit(w, blocksize=64, quant_type=quant_type)
    code = code_book(quant_type)
    for start in range(0, w.numel(), 64):
        block, block_hat = w.flatten()[start : start + 64], w_hat.flatten()[start : start + 64]
        assert block_hat.unique().numel() <= 16
        absmax = block.abs().max()
        scaled, scaled_hat = block / absmax, block_hat / absmax
        nearest = (scaled[:, None] - code[None, :]).abs().min(dim=1).values
        assert torch.all((scaled - scaled_hat).abs() <= nearest + 1e-6), f"block at {start}"
        assert torch.all((scaled_hat[:, None] - code[None, :]).abs().min(dim=1).values <= 1e-6)


@needs_bnb
@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_bnb_4bit_on_grid_round_trips_exactly(quant_type):
    """w = 2^k·c with each block holding ±1 (so absmax = 2^k): every operation is exact, ŵ = w."""
    code = code_book(quant_type)
    idx = torch.randint(0, 16, (8, 64))
    idx[:, 0] = int((code == 1.0).nonzero())  # each 64-weight row is one block with absmax 2^k
    w = code[idx] * torch.pow(2.0, -torch.arange(8.0)).unsqueeze(1)
    assert torch.equal(bnb_quantize_4bit(w, blocksize=64, quant_type=quant_type), w)


# --- bnb 8 bit (LLM.int8) ------------------------------------------------------------------------


@needs_bnb
def test_bnb_int8_keeps_row_absmax_exactly_and_at_most_255_values():
    """Row-wise absmax int8: ŵ = q·a/127, q ∈ [−127, 127]. Weights already in float16 (bnb's input
    dtype), so the row absmax a comes back exactly; 600 columns could hold far more than 255 values."""
    w = torch.randn(24, 600).half().float()
    w[3] = 0.0  # a zero row stays zero, no NaN
    w_hat, absmax = bnb_quantize_8bit(w)
    assert torch.equal(w_hat.abs().amax(dim=1), w.abs().amax(dim=1))
    assert torch.equal(absmax, w.abs().amax(dim=1))
    assert torch.equal(w_hat[3], torch.zeros(600))
    for row in w_hat:
        assert row.unique().numel() <= 255
    q = w_hat[absmax > 0] * 127 / absmax[absmax > 0, None]
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)


@needs_bnb
def test_bnb_int8_on_grid_round_trips_exactly():
    """w = q·2^-10 with |q| ≤ 127 and ±127 in every row: absmax = 127·2^-10, 127/absmax = 2^10, ŵ = w."""
    q = torch.randint(-127, 128, (6, 40)).float()
    q[:, 0] = torch.tensor([127.0, -127.0, 127.0, -127.0, 127.0, 127.0])
    w = q * 2.0**-10
    assert torch.equal(bnb_quantize_8bit(w)[0], w)


@needs_bnb
def test_bnb_int8_weight_beyond_float16_is_a_clear_error():
    with pytest.raises(UnlearnflowError, match="float16"):
        bnb_quantize_8bit(torch.tensor([[1e5, 1.0]]))


@needs_bnb
def test_bnb_linear8bitlt_training_path_uses_the_dequantized_weights():
    """What runs on CPU: ``Linear8bitLt`` in training mode (MatMul8bitFp) is F.linear with
    CB·SCB/127, our ŵ up to bnb's float32 ·(1/127) (one ulp: rtol 1e-5). At inference
    (MatMul8bitLt) LLM.int8 also quantizes the activations, which a dequantized checkpoint does not
    reproduce (measured ~0.4–0.7% relative output difference per layer)."""
    import bitsandbytes as bnb

    lin = nn.Linear(64, 32)
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(lin.bias.detach().clone())
    layer = layer.to("cpu").train()
    quantize_model(nn.Sequential(lin), QuantizeAttackConfig(bits=8))
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)


# --- round to nearest ----------------------------------------------------------------------------


def test_rtn_int8_error_at_most_half_a_step():
    """|ŵ − w| ≤ s/2 elementwise, s the weight's group scale (plus one float32 ulp of w for the
    division and the product); a zero group has s = 0 and ŵ = 0."""
    w = torch.randn(6, 50)
    w[2, 16:32] = 0.0
    w_hat, scale = rtn_quantize(w, bits=8, group_size=16)
    s = scale.repeat_interleave(16, dim=1)[:, :50]
    ulp = torch.finfo(torch.float32).eps * w.abs()
    assert torch.all((w_hat - w).abs() <= s / 2 + ulp)
    assert scale[2, 1] == 0 and torch.equal(w_hat[2, 16:32], torch.zeros(16))
    assert not torch.isnan(w_hat).any()
    assert float(((w_hat - w).abs() / s.clamp_min(1e-30)).max()) > 0.45  # it does round


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_on_grid_round_trips_exactly(bits):
    """w = q·2^-k with integer |q| ≤ q_max and ±q_max in each group: s = 2^-k exactly, ŵ = w."""
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (4, 3, 8)).float()
    q[..., 0] = qmax
    q[1, :, 0] = -qmax
    step = torch.pow(2.0, -torch.arange(12.0)).reshape(4, 3, 1)
    w = (q * step).reshape(4, 24)
    w_hat, scale = rtn_quantize(w, bits=bits, group_size=8)
    assert torch.equal(w_hat, w)
    assert torch.equal(scale, step.squeeze(-1))


def test_rtn_4bit_groups_take_at_most_15_values():
    w_hat, _ = rtn_quantize(torch.randn(8, 96), bits=4, group_size=32)
    counts = [g.unique().numel() for g in w_hat.reshape(-1, 32)]
    assert max(counts) <= 15 and min(counts) >= 8  # q ∈ {−7, …, 7}, and most of them are used


def test_rtn_group_that_does_not_divide_the_width_ends_short():
    """Width 10, groups of 4: [0:4], [4:8] and a last group [8:10] of two weights, each its own scale."""
    w = torch.randn(3, 10)
    w_hat, scale = rtn_quantize(w, bits=4, group_size=4)
    assert scale.shape == (3, 3)
    for j, cols in enumerate([slice(0, 4), slice(4, 8), slice(8, 10)]):
        s = w[:, cols].abs().amax(dim=1, keepdim=True) / 7
        torch.testing.assert_close(scale[:, j], s.squeeze(1), rtol=0, atol=0)
        torch.testing.assert_close(w_hat[:, cols], (w[:, cols] / s).round() * s, rtol=0, atol=0)
    # A group wider than the row is the row: the same as one scale per output row.
    assert torch.equal(
        rtn_quantize(w, bits=4, group_size=128)[0], rtn_quantize(w, bits=4, group_size=None)[0]
    )


# --- the attack on a model -----------------------------------------------------------------------


@pytest.mark.parametrize("name", names(*sorted(CONFIGS)))
@pytest.mark.parametrize("tied", [True, False])
def test_only_the_non_head_linears_change(name, tied, make_tiny_model):
    """Every Linear weight but the LM head's changes; embeddings (tied to the head or not), norms
    and everything else stay bit for bit."""
    model = make_tiny_model(tie_word_embeddings=tied)
    targets = {f"{n}.weight" for n, _ in quantizable_linears(model)}
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down per layer; not lm_head
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in targets)
    before = snapshot(model)
    stats = quantize_model(model, CONFIGS[name])
    assert stats["quantized_layers"] == 14.0
    for n, p in model.named_parameters():
        if n in targets:
            assert not torch.equal(before[n], p), f"{name}: {n} was not quantized"
        else:
            assert torch.equal(before[n], p), f"{name}: {n} must stay untouched"
    assert ("lm_head.weight" in before) is not tied


def test_a_linear_tied_to_an_embedding_is_skipped():
    """Without get_output_embeddings, a Linear sharing an Embedding's weight is still left alone."""
    model = nn.Module()
    model.emb, model.proj, model.mlp = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False), nn.Linear(8, 8)
    model.proj.weight = model.emb.weight
    assert [n for n, _ in quantizable_linears(model)] == ["mlp"]


@pytest.mark.parametrize("name", names("bnb-fp4", "bnb-int8", "rtn-4-g16"))
def test_same_model_twice_gives_identical_weights(name, make_tiny_model):
    a, b = make_tiny_model(), make_tiny_model()
    assert quantize_model(a, CONFIGS[name]) == quantize_model(b, CONFIGS[name])
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", names("bnb-fp4", "bnb-int8", "rtn-4-g16"))
def test_half_precision_models_keep_their_dtype(name, dtype, make_tiny_model):
    """Computed in float32 (bnb int8: float16, its input dtype), written back in the model's dtype."""
    model, reference = make_tiny_model().to(dtype), make_tiny_model().to(dtype)
    quantize_model(model, CONFIGS[name])
    for n, p in model.named_parameters():
        assert p.dtype == dtype and not torch.isnan(p).any(), n
    lin = dict(quantizable_linears(reference))["model.layers.0.mlp.up_proj"]
    w_hat = {
        "bnb-fp4": lambda w: bnb_quantize_4bit(w, blocksize=64, quant_type="fp4"),
        "bnb-int8": lambda w: bnb_quantize_8bit(w)[0],
        "rtn-4-g16": lambda w: rtn_quantize(w, bits=4, group_size=16)[0],
    }[name](lin.weight.float())
    assert torch.equal(model.get_parameter("model.layers.0.mlp.up_proj.weight"), w_hat.to(dtype))


def test_quantize_attack_from_a_parsed_section(tiny_model):
    """``attack.names: [q4]`` with its section → the registered attack → its three statistics, and
    quant_rel_change = ‖Ŵ − W‖/‖W‖ over the quantized weights together."""
    cfg = parse_section(
        {"names": ["q4"], "q4": {"kind": "quantize", "backend": "rtn", "bits": 4, "group_size": 16}},
        "attack",
        AttackConfig,
    )
    attack = build_attack("q4", cfg)
    assert attack.modifies_weights
    targets = [f"{n}.weight" for n, _ in quantizable_linears(tiny_model)]
    before = snapshot(tiny_model)
    stats = attack.apply(tiny_model, AttackContext())
    assert set(stats) == {"quantized_layers", "quant_rel_change", "quant_bits"}
    assert all(isinstance(v, float) for v in stats.values())
    assert (stats["quantized_layers"], stats["quant_bits"]) == (14.0, 4.0)
    diff = sum(float((tiny_model.get_parameter(n).detach() - before[n]).pow(2).sum()) for n in targets)
    norm = sum(float(before[n].pow(2).sum()) for n in targets)
    assert stats["quant_rel_change"] == pytest.approx((diff / norm) ** 0.5, rel=1e-6)
    assert 0.05 < stats["quant_rel_change"] < 0.2  # 4 bit moves a Gaussian matrix by ~10%


def test_bnb_block_size_bitsandbytes_rejects_is_a_config_error():
    with pytest.raises(ConfigError, match=r"bad value for attack\.q\.blocksize: 48: Input should be 32, 64"):
        parse_section({"names": ["q"], "q": {"kind": "quantize", "blocksize": 48}}, "attack", AttackConfig)


def test_bnb_backend_without_bitsandbytes_says_how_to_install(monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UnlearnflowError, match="pip install bitsandbytes"):
        quantize_model(tiny_model, FP4)
