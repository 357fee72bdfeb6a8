"""Losses against hand-computed values (maths in each docstring) and plain-torch references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unlearnflow.losses import grad_ascent_loss, kl_retain_loss, nll_loss, sequence_nll

IGN = -100


def uniform_logits(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.zeros(batch, length, vocab)


def test_sequence_nll_uniform_logits_hand_value():
    """Uniform logits over V=4 → every token costs ln 4; row 0 has 2 answer tokens, row 1 has 1.

    labels[:, 1:] are the predicted tokens (shifted mask): row 0 → [IGN, 2, 3] → 2 tokens,
    row 1 → [IGN, 1, IGN] → 1 token. seqNLL = [2 ln 4, ln 4].
    """
    labels = torch.tensor([[IGN, IGN, 2, 3], [IGN, IGN, 1, IGN]])
    seq, n = sequence_nll(uniform_logits(2, 4, 4), labels)
    torch.testing.assert_close(seq, torch.tensor([2 * math.log(4), math.log(4)]))
    torch.testing.assert_close(n, torch.tensor([2.0, 1.0]))


def test_nll_matches_cross_entropy_on_answer_tokens():
    """Token mean over the batch equals F.cross_entropy with ignore_index on the shifted pair."""
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = IGN
    labels[1, 4:] = IGN
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGN)
    torch.testing.assert_close(nll_loss(logits, labels), expected)
    torch.testing.assert_close(grad_ascent_loss(logits, labels), -expected)


def test_all_masked_batch_is_zero_not_nan():
    labels = torch.full((2, 5), IGN)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    for loss in (nll_loss(logits, labels), kl_retain_loss(logits, logits.detach(), labels)):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_token_weight_turns_microbatch_means_into_the_step_token_mean():
    """Two micro-batches with 1 and 3 answer tokens: weights 1/2 and 3/2 (mean 2 tokens each).

    (½·mean₁ + 3/2·mean₂)/2 = (sum₁ + sum₂)/4, the token mean of the whole step.
    """
    logits = torch.randn(2, 5, 9)
    labels = torch.tensor([[IGN, IGN, IGN, IGN, 4], [IGN, 1, 2, 3, IGN]])
    whole = nll_loss(logits, labels)
    parts = (
        nll_loss(logits[:1], labels[:1], token_weight=0.5)
        + nll_loss(logits[1:], labels[1:], token_weight=1.5)
    ) / 2
    torch.testing.assert_close(parts, whole)


def test_grad_ascent_gradient_lowers_the_label_logit():
    """−NLL = log p_y: ∂/∂z_y = 1 − p_y = 2/3 and ∂/∂z_k = −p_k = −1/3 for uniform logits over 3.

    A descent step z ← z − lr·g therefore lowers the labelled token's logit (the sign of forgetting).
    """
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    labels = torch.tensor([[IGN, 1]])
    grad_ascent_loss(logits, labels).backward()
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([-1 / 3, 2 / 3, -1 / 3]))
    torch.testing.assert_close(logits.grad[0, 1], torch.zeros(3))


def test_kl_retain_hand_value_and_zero_at_reference():
    """One answer position, π_ref = softmax([ln 3, 0]) = [3/4, 1/4], π_θ uniform [1/2, 1/2].

    KL = 3/4·ln(3/4 / 1/2) + 1/4·ln(1/4 / 1/2) = 3/4·ln 1.5 − 1/4·ln 2.
    """
    labels = torch.tensor([[IGN, 0]])
    ref = torch.tensor([[[math.log(3.0), 0.0], [5.0, 5.0]]])
    model = torch.zeros(1, 2, 2)
    expected = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)
    assert kl_retain_loss(model, ref, labels).item() == pytest.approx(expected, rel=1e-6)
    assert kl_retain_loss(ref, ref, labels).item() == pytest.approx(0.0, abs=1e-7)
