"""Attacks: seeded, of the requested size, and only where they should act."""

from __future__ import annotations

import pytest
import torch

from unlearnflow.attacks import ATTACKS, AttackContext, build_attack
from unlearnflow.attacks.noise import add_relative_noise
from unlearnflow.config import AttackConfig, ConfigError, parse_section


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_noise_is_seeded_and_relative(tiny_model, make_tiny_model):
    twin = make_tiny_model()
    before = snapshot(tiny_model)
    ratio = add_relative_noise(tiny_model, sigma=0.05, seed=3)
    add_relative_noise(twin, sigma=0.05, seed=3)
    for (n, p), q in zip(tiny_model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), f"{n}: same seed must give the same noise"
        delta = (p - before[n]).norm() / before[n].norm()
        if p.dim() >= 2:
            # ‖σ·rms(W)·ε‖ / ‖W‖ ≈ σ for ε ~ N(0, I): rms(W)·√n = ‖W‖ and ‖ε‖ ≈ √n.
            assert delta.item() == pytest.approx(0.05, rel=0.2), n
        else:
            assert delta.item() == 0.0, f"{n}: vectors (norm gains) are left alone"
    assert ratio == pytest.approx(0.05, rel=0.2)


def test_other_seed_other_noise(tiny_model):
    a = snapshot(tiny_model)
    add_relative_noise(tiny_model, sigma=0.05, seed=1)
    b = snapshot(tiny_model)
    add_relative_noise(tiny_model, sigma=0.05, seed=2)
    name = next(n for n, p in tiny_model.named_parameters() if p.dim() >= 2)
    assert not torch.allclose(b[name] - a[name], tiny_model.get_parameter(name) - b[name])


def test_none_attack_changes_nothing(tiny_model):
    before = snapshot(tiny_model)
    attack = build_attack("none", AttackConfig())
    assert attack.apply(tiny_model, AttackContext()) == {} and not attack.modifies_weights
    for n, p in tiny_model.named_parameters():
        assert torch.equal(before[n], p)


def test_noise_attack_reads_its_section():
    attack = build_attack("noise", AttackConfig.model_validate({"noise": {"sigma": 0.2, "seed": 7}}))
    assert attack.args.sigma == 0.2 and attack.modifies_weights
    assert sorted(ATTACKS) == ["noise", "none", "quantize", "relearn"]


def test_named_attack_sections_take_their_kind():
    """Several attacks of one kind live side by side under free names; ``kind`` defaults to the key."""
    cfg = parse_section(
        {
            "names": ["none", "quantize_4bit", "quantize_8bit", "relearn"],
            "controls": ["quantize_4bit"],
            "quantize_4bit": {"kind": "quantize", "bits": 4, "quant_type": "nf4"},
            "quantize_8bit": {"kind": "quantize", "bits": 8},
            "relearn": {"steps": [2, 4]},
        },
        "attack",
        AttackConfig,
    )
    assert [cfg.args(n).kind for n in cfg.names] == ["none", "quantize", "quantize", "relearn"]
    assert (cfg.args("quantize_4bit").bits, cfg.args("quantize_4bit").quant_type) == (4, "nf4")
    assert cfg.args("quantize_8bit").bits == 8 and cfg.args("relearn").steps == [2, 4]
    assert build_attack("quantize_8bit", cfg).args.bits == 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"names": ["q"], "q": {"kind": "quantise"}},
            "attack.q: kind 'quantise' is unknown; allowed kinds: none",
        ),
        ({"names": ["q"], "q": {"kind": "quantize", "bits": 3}}, "bad value for attack.q.bits: 3"),
        ({"names": ["q"], "q": {"kind": "quantize", "bitz": 4}}, "unknown key attack.q.bitz"),
        ({"names": ["q4"]}, "attack.names: 'q4' has no section attack.q4 and is no attack kind"),
        ({"names": ["none"], "controls": ["q4"]}, "attack.controls: 'q4' has no section attack.q4"),
        ({"names": ["none", "none"]}, "distinct"),
        ({"names": ["relearn"], "relearn": {"steps": [5, 5]}}, "strictly increasing"),
    ],
)
def test_bad_attack_sections_are_one_line_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_section(raw, "attack", AttackConfig)
    assert message in str(err.value) and "\n" not in str(err.value)
