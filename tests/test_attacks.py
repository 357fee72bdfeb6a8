"""Attacks: seeded, of the requested size, and only where they should act."""

from __future__ import annotations

import pytest
import torch

from unlearnflow.attacks import ATTACKS, build_attack
from unlearnflow.attacks.noise import add_relative_noise
from unlearnflow.config import AttackConfig, NoiseAttackConfig


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
    assert attack.apply(tiny_model) == {} and not attack.modifies_weights
    for n, p in tiny_model.named_parameters():
        assert torch.equal(before[n], p)


def test_noise_attack_reads_its_section():
    attack = build_attack("noise", AttackConfig(noise=NoiseAttackConfig(sigma=0.2, seed=7)))
    assert attack.args.sigma == 0.2 and attack.modifies_weights
    assert sorted(ATTACKS) == ["noise", "none"]
