"""weights.py: which matrices a quantization attack touches, and the unlearning's size in 4-bit steps."""

from __future__ import annotations

import math

import pytest
import torch

from unlearnflow.attacks.quantize import quantizable_linears
from unlearnflow.errors import UnlearnflowError
from unlearnflow.weights import _grid, weight_change


def save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_grid_codes_and_steps_of_a_hand_matrix():
    """Group 128 over a width of 130: two groups per row, the second two weights wide."""
    w = torch.zeros(1, 130)
    w[0, 0], w[0, 1], w[0, 128], w[0, 129] = 7.0, -2.0, 0.5, -0.25
    codes, step = _grid(w)
    assert torch.equal(step[0, :128], torch.ones(128)) and torch.equal(
        step[0, 128:], torch.full((2,), 0.5 / 7)
    )
    # −0.25 / fl(0.5 / 7) = −3.4999998: rounds to −3
    assert codes[0, :2].tolist() == [7.0, -2.0] and codes[0, 128:].tolist() == [7.0, -3.0]
    zero_codes, zero_step = _grid(torch.zeros(2, 4))
    assert not zero_codes.any() and not zero_step.any()


def test_weight_change_of_the_reference_itself_is_zero(tmp_path, make_tiny_model):
    model = make_tiny_model()
    change = weight_change(model, save(model, tmp_path / "ref"))
    assert change == {"rel_change": 0.0, "rel_change_max": 0.0, "q4_step_ratio": 0.0, "q4_code_change": 0.0}


def test_weight_change_measures_norms_and_grid_steps(tmp_path, make_tiny_model):
    """One matrix moved by δ = 0.1 of its own 4-bit step, everything else still: the relative change is
    ‖δ‖/‖θ‖ over all quantizable matrices, the step ratio 0.1 over that matrix's share of weights, and
    few codes move; moving it by 2 full steps changes almost every code of that matrix."""
    model = make_tiny_model()
    ref = save(model, tmp_path / "ref")
    linears = dict(quantizable_linears(model))
    w = next(iter(linears.values())).weight
    _, step = _grid(w.detach())
    total = sum(m.weight.numel() for m in linears.values())
    norm = math.sqrt(sum(float(m.weight.detach().square().sum()) for m in linears.values()))
    with torch.no_grad():
        w.add_(0.1 * step)
    small = weight_change(model, ref)
    assert small["rel_change"] == pytest.approx(float((0.1 * step).norm()) / norm, rel=1e-5)
    assert small["q4_step_ratio"] == pytest.approx(0.1 * w.numel() / total, rel=1e-4)
    assert small["q4_code_change"] < 0.25 * w.numel() / total
    with torch.no_grad():
        w.add_(1.9 * step)
    big = weight_change(model, ref)
    assert big["q4_code_change"] > 0.8 * w.numel() / total
    assert big["rel_change_max"] > big["rel_change"]


def test_a_reference_without_weights_is_one_line(tmp_path, make_tiny_model):
    with pytest.raises(UnlearnflowError, match="no safetensors weights"):
        weight_change(make_tiny_model(), tmp_path)
