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


# --- Forget losses of the method zoo (issue 9) ----------------------------------------------------

from unlearnflow.losses import (  # noqa: E402  (appended section: imports kept next to their tests)
    answer_mask,
    ceu_loss,
    flatten_loss,
    idk_dpo_loss,
    idk_nll_loss,
    npo_loss,
    rmu_forget_loss,
    rmu_retain_loss,
    satimp_loss,
    simnpo_loss,
    undial_loss,
    wga_loss,
)

LN = math.log


def test_answer_mask_is_unshifted_labels_not_ignored():
    labels = torch.tensor([[IGN, 3, IGN, 0], [IGN, IGN, IGN, IGN]])
    expected = torch.tensor([[False, True, False, True], [False, False, False, False]])
    assert torch.equal(answer_mask(labels), expected)


def test_npo_hand_value_and_rows_without_answer_are_excluded():
    """β = 1, V = 2, one answer token per row (label 0, predicted by logits[:, 0]); π_ref uniform.

    Row 0: π_θ(0) = softmax([ln 3, 0])₀ = 3/4 → log-ratio ln(3/4 ÷ 1/2) = ln 1.5 → softplus = ln 2.5.
    Row 1: π_θ uniform → log-ratio 0 → softplus = ln 2. Row 2 has no answer token: left out.
    (2/β)·mean = 2·(ln 2.5 + ln 2)/2 = ln 5.
    """
    labels = torch.tensor([[IGN, 0], [IGN, 0], [IGN, IGN]])
    logits = torch.zeros(3, 2, 2)
    logits[0, 0, 0] = LN(3.0)
    logits[2] = 7.0  # an excluded row's logits must not matter
    ref = torch.zeros(3, 2, 2)
    torch.testing.assert_close(npo_loss(logits, labels, ref, beta=1.0), torch.tensor(LN(5.0)))


def test_npo_at_the_reference_is_two_over_beta_log_two():
    """θ = ref → every log-ratio is 0 → (2/β)·softplus(0) = (2/β)·ln 2, whatever the logits."""
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = IGN
    torch.testing.assert_close(npo_loss(logits, labels, logits.clone(), beta=0.1), torch.tensor(20 * LN(2.0)))


def test_npo_never_sends_gradient_to_the_reference():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    ref = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[IGN, 1, 2, 3], [IGN, IGN, 4, 0]])
    npo_loss(logits, labels, ref).backward()
    assert ref.grad is None
    assert logits.grad.abs().sum() > 0


def test_seq_weight_turns_microbatch_sequence_means_into_the_step_mean():
    """Micro-batches of 1 and 3 rows (mean 2 rows each): weights 1/2 and 3/2.

    (½·mean₁ + 3/2·mean₂)/2 = (sum₁ + sum₂)/4, the sequence mean of the whole step.
    """
    logits, ref = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    labels = torch.randint(0, 7, (4, 5))
    labels[:, :2] = IGN
    for loss in (
        lambda lo, la, r, w: npo_loss(lo, la, r, seq_weight=w),
        lambda lo, la, r, w: simnpo_loss(lo, la, seq_weight=w),
    ):
        whole = loss(logits, labels, ref, 1.0)
        parts = (loss(logits[:1], labels[:1], ref[:1], 0.5) + loss(logits[1:], labels[1:], ref[1:], 1.5)) / 2
        torch.testing.assert_close(parts, whole)


def test_simnpo_hand_value_uses_the_length_normalised_nll():
    """V = 4. Row 0: two answer tokens under uniform logits → avgNLL = ln 4 (seqNLL 2·ln 4).
    Row 1: one token with p = 1/2 (logits [ln 3, 0, 0, 0] → 3/6) → avgNLL = ln 2.

    β = 1, δ = 0: σ(ln 4) = 4/5, σ(ln 2) = 2/3 → −2·mean(ln 4/5, ln 2/3) = ln 5/4 + ln 3/2.
    β = 1, δ = ln 2: σ(ln 2) = 2/3, σ(0) = 1/2 → ln 3/2 + ln 2 = ln 3.
    """
    labels = torch.tensor([[IGN, 1, 2], [IGN, 0, IGN]])
    logits = torch.zeros(2, 3, 4)
    logits[1, 0, 0] = LN(3.0)
    torch.testing.assert_close(simnpo_loss(logits, labels, beta=1.0), torch.tensor(LN(1.25) + LN(1.5)))
    torch.testing.assert_close(
        simnpo_loss(logits, labels, beta=1.0, delta=LN(2.0)), torch.tensor(LN(3.0)), rtol=1e-6, atol=1e-6
    )


def test_simnpo_descent_raises_the_average_nll():
    """−log σ(β·avgNLL) decreases in avgNLL, so a gradient-descent step on the logits must raise it."""
    logits = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[IGN, IGN, 1, 2, 3], [IGN, 4, 5, IGN, IGN]])
    simnpo_loss(logits, labels).backward()
    before, n = sequence_nll(logits.detach(), labels)
    after, _ = sequence_nll(logits.detach() - 0.5 * logits.grad, labels)
    assert ((after / n) > (before / n)).all()


def test_idk_dpo_hand_value_paired_rows_and_empty_pairs_excluded():
    """β = 1, V = 2, π_ref uniform. Row 0: idk token p = 3/4 → idk log-ratio ln 1.5; forget log-ratio 0
    → margin ln 1.5 → σ = 1.5/2.5 = 3/5 → −2·ln(3/5). Row 1: both log-ratios 0 → −2·ln(1/2).
    Row 2: its forget answer is empty → excluded. Mean = ln(5/3) + ln 2 = ln(10/3).
    The two batches have different lengths (3 and 2): rows are paired, not positions.
    """
    labels_idk = torch.tensor([[IGN, IGN, 0], [IGN, IGN, 1], [IGN, IGN, 1]])
    logits_idk = torch.zeros(3, 3, 2)
    logits_idk[0, 1, 0] = LN(3.0)
    labels_f = torch.tensor([[IGN, 1], [IGN, 0], [IGN, IGN]])
    logits_f = torch.zeros(3, 2, 2)
    loss = idk_dpo_loss(
        logits_idk, labels_idk, torch.zeros(3, 3, 2), logits_f, labels_f, torch.zeros(3, 2, 2), beta=1.0
    )
    torch.testing.assert_close(loss, torch.tensor(LN(10.0 / 3.0)))


def test_idk_dpo_at_the_reference_is_two_over_beta_log_two_and_rows_must_pair():
    li, lf = torch.randn(2, 5, 9), torch.randn(2, 4, 9)
    yi, yf = torch.randint(0, 9, (2, 5)), torch.randint(0, 9, (2, 4))
    yi[:, :2], yf[:, :1] = IGN, IGN
    torch.testing.assert_close(idk_dpo_loss(li, yi, li, lf, yf, lf, beta=0.1), torch.tensor(20 * LN(2.0)))
    with pytest.raises(ValueError, match="paired"):
        idk_dpo_loss(li, yi, li, lf[:1], yf[:1], lf[:1])


def test_idk_nll_is_cross_entropy_on_refusal_answer_tokens():
    logits = torch.randn(2, 6, 10)
    labels = torch.randint(0, 10, (2, 6))
    labels[:, :3] = IGN
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=IGN)
    torch.testing.assert_close(idk_nll_loss(logits, labels), expected)
    torch.testing.assert_close(idk_nll_loss(logits, labels, token_weight=3.0), 3 * expected)


def rmu_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D = 2, control c·u = [1, 0]. Row 0 scores positions 1, 2; row 1 position 1; the rest is huge.

    ‖[1, 2] − [1, 0]‖² = 4, ‖[4, 1] − [1, 0]‖² = 10, ‖[1, 1] − [1, 0]‖² = 1.
    Token mean: (4 + 10 + 1)/3 = 5 ("sum"), 5/D = 2.5 ("mean"). (Per-row first: (7 + 1)/2 = 4.)
    """
    hidden = torch.tensor(
        [[[100.0, 100.0], [1.0, 2.0], [4.0, 1.0]], [[100.0, -100.0], [1.0, 1.0], [50.0, 50.0]]],
        requires_grad=True,
    )
    mask = torch.tensor([[False, True, True], [False, True, False]])
    return hidden, mask, torch.tensor([1.0, 0.0])


def test_rmu_forget_hand_value_token_mean_over_unshifted_positions():
    hidden, mask, control = rmu_example()
    torch.testing.assert_close(
        rmu_forget_loss(hidden, mask, control, hidden_reduction="sum"), torch.tensor(5.0)
    )
    torch.testing.assert_close(rmu_forget_loss(hidden, mask, control), torch.tensor(2.5))
    torch.testing.assert_close(rmu_forget_loss(hidden, mask, control, token_weight=2.0), torch.tensor(5.0))
    with pytest.raises(ValueError, match="bool"):
        rmu_forget_loss(hidden, mask.long(), control)


def test_rmu_retain_hand_value_and_reference_gets_no_gradient():
    """Same positions, reference = the control broadcast: same distances as the forget example."""
    hidden, mask, control = rmu_example()
    ref = control.expand(2, 3, 2).clone().requires_grad_(True)
    loss = rmu_retain_loss(hidden, ref, mask)
    torch.testing.assert_close(loss, torch.tensor(2.5))
    loss.backward()
    assert ref.grad is None
    # ∂/∂h of ‖h − r‖²/(D·K) = 2(h − r)/(2·3) on scored positions, 0 elsewhere.
    expected = torch.zeros(2, 3, 2)
    expected[mask] = (hidden.detach()[mask] - control) / 3
    torch.testing.assert_close(hidden.grad, expected)


def test_undial_hand_value_on_answer_positions_only():
    """V = 2, y = 0 predicted by logits[:, 1]; ref logits [0, 0], β = ln 3 → target softmax([−ln 3, 0])
    = [1/4, 3/4]. Model logits [ln 3, 0] → π_θ = [3/4, 1/4].
    Soft CE = −(1/4·ln 3/4 + 3/4·ln 1/4) = 1/4·ln(4/3) + 3/4·ln 4. Positions 0 and 2 are not scored.
    """
    labels = torch.tensor([[IGN, IGN, 0]])
    logits = torch.tensor([[[9.0, -9.0], [LN(3.0), 0.0], [-9.0, 9.0]]])
    ref = torch.tensor([[[5.0, 0.0], [0.0, 0.0], [0.0, 5.0]]])
    expected = 0.25 * LN(4.0 / 3.0) + 0.75 * LN(4.0)
    torch.testing.assert_close(undial_loss(logits, ref, labels, beta=LN(3.0)), torch.tensor(expected))


def test_undial_target_moves_mass_off_the_true_token():
    """∂(soft CE)/∂z = π_θ − q (one scored position), so q = softmax(z) − grad can be read back.

    At θ = ref: q = softmax(z_ref − β·e_y), strictly less mass on y than π_ref, and no gradient to ref.
    """
    z = torch.randn(1, 2, 6)
    logits, ref = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    labels = torch.tensor([[IGN, 4]])
    undial_loss(logits, ref, labels, beta=2.0).backward()
    q = F.softmax(z[0, 0], -1) - logits.grad[0, 0]
    torch.testing.assert_close(q, F.softmax(z[0, 0] - 2.0 * F.one_hot(torch.tensor(4), 6), -1))
    assert q[4] < F.softmax(z[0, 0], -1)[4]
    assert ref.grad is None


def test_ceu_hand_value_and_first_answer_token_ignored():
    """V = 3. Row [IGN, IGN, 0, 0]: logits[:, 1] predicts the first answer token (ignored, n = 1),
    logits[:, 2] predicts the second. Position 2 logits [0, 0, ln 2], y = 0:
    q = softmax([−∞, 0, ln 2]) = [0, 1/3, 2/3]; log π = [−ln 4, −ln 4, −ln 2];
    CE-U = 1/3·ln 4 + 2/3·ln 2 = 4/3·ln 2. Position 1 ([0, 0, 0], y = 0): q = [0, 1/2, 1/2],
    CE = ln 3. With n = 0 both count: (4/3·ln 2 + ln 3)/2. With n = 2 nothing is left → 0.
    """
    labels = torch.tensor([[IGN, IGN, 0, 0]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 2, 2] = LN(2.0)
    logits[0, 0] = torch.tensor([5.0, -5.0, 0.0])  # unscored prompt position
    torch.testing.assert_close(ceu_loss(logits, labels), torch.tensor(4 / 3 * LN(2.0)))
    both = (4 / 3 * LN(2.0) + LN(3.0)) / 2
    torch.testing.assert_close(ceu_loss(logits, labels, ignore_first_n_answer_tokens=0), torch.tensor(both))
    assert ceu_loss(logits, labels, ignore_first_n_answer_tokens=2).item() == 0.0


def test_ceu_target_is_detached_and_has_zero_mass_on_the_true_token():
    """With a detached target q the gradient is softmax(z) − q, so q = softmax(z) − grad:
    q_y = 0 and q ∝ softmax(z) on the other tokens (renormalised)."""
    z = torch.randn(1, 3, 5)
    logits = z.clone().requires_grad_(True)
    labels = torch.tensor([[IGN, 3, 1]])  # first answer token (3) ignored: only logits[:, 1] → 1 scored
    ceu_loss(logits, labels).backward()
    q = F.softmax(z[0, 1], -1) - logits.grad[0, 1]
    expected = F.softmax(z[0, 1], -1) * (torch.arange(5) != 1)
    torch.testing.assert_close(q, expected / expected.sum())
    assert q[1].abs() < 1e-7
    torch.testing.assert_close(logits.grad[0, 0], torch.zeros(5))


def two_token_example() -> tuple[torch.Tensor, torch.Tensor]:
    """V = 2, logits [ln 3, 0] at both scored positions (t = 0, 1): p(0) = 3/4, p(1) = 1/4.
    Labels 0 then 1: ℓ = ln(4/3) with p = 3/4, ℓ = ln 4 with p = 1/4. t = 2 predicts nothing."""
    logits = torch.tensor([[[LN(3.0), 0.0], [LN(3.0), 0.0], [-9.0, 9.0]]], requires_grad=True)
    return logits, torch.tensor([[IGN, 0, 1]])


def test_wga_hand_value():
    """β = 1: −(3/4·ln(4/3) + 1/4·ln 4)/2.   β = 2: −(9/16·ln(4/3) + 1/16·ln 4)/2."""
    logits, labels = two_token_example()
    l1, l2 = LN(4.0 / 3.0), LN(4.0)
    torch.testing.assert_close(wga_loss(logits, labels), torch.tensor(-(0.75 * l1 + 0.25 * l2) / 2))
    torch.testing.assert_close(
        wga_loss(logits, labels, beta=2.0), torch.tensor(-(9 / 16 * l1 + 1 / 16 * l2) / 2)
    )


def test_satimp_hand_value():
    """β1 = 5, β2 = 1: weights (3/4)⁵·(1/4) and (1/4)⁵·(3/4) → −(w₁·ln(4/3) + w₂·ln 4)/2."""
    logits, labels = two_token_example()
    w1, w2 = 0.75**5 * 0.25, 0.25**5 * 0.75
    expected = -(w1 * LN(4.0 / 3.0) + w2 * LN(4.0)) / 2
    torch.testing.assert_close(satimp_loss(logits, labels), torch.tensor(expected))


@pytest.mark.parametrize(
    ("loss_fn", "weights"),
    [
        (lambda lo, la, **kw: wga_loss(lo, la, beta=1.5, **kw), lambda p: p**1.5),
        (
            lambda lo, la, **kw: satimp_loss(lo, la, beta1=2.0, beta2=0.5, **kw),
            lambda p: p**2 * (1 - p) ** 0.5,
        ),
    ],
    ids=["wga", "satimp"],
)
def test_reweighted_ascent_weights_are_detached(loss_fn, weights):
    """The gradient equals that of −mean_t w_t·ℓ_t with w_t precomputed as constants."""
    z = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGN, 1, 2, 3, 4], [IGN, IGN, 5, 6, IGN]])
    logits = z.clone().requires_grad_(True)
    loss_fn(logits, labels).backward()

    ref = z.clone().requires_grad_(True)
    token_nll = F.cross_entropy(ref[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none")
    keep = labels[:, 1:].reshape(-1) != IGN
    w = weights(torch.exp(-token_nll.detach()))
    (-(w * token_nll)[keep].mean()).backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    torch.testing.assert_close(loss_fn(z, labels, token_weight=2.0), 2 * loss_fn(z, labels))


def flatten_example() -> tuple[torch.Tensor, torch.Tensor]:
    """V = 3; logits[b, t] = [3s, 0, 0] → max 3s, mean s → (max − mean)² = 4s².

    s = [[1, 2, 3, 4], [5, 0, 1, 2]] → per-position values m = [[4, 16, 36, 64], [100, 0, 4, 16]].
    Labels: row 0 answers at t = 2, 3; row 1 at t = 3.
    """
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 1.0, 2.0]])
    logits = torch.zeros(2, 4, 3)
    logits[..., 0] = 3 * s
    return logits, torch.tensor([[IGN, IGN, 7, 8], [IGN, IGN, IGN, 9]])


@pytest.mark.parametrize(
    ("alignment", "reduction", "expected"),
    [
        # shifted: logits[:, t] for labels[:, t+1] → row 0 t = 1, 2 (16, 36); row 1 t = 2 (4).
        ("shifted", "per_token", 56 / 3),
        ("shifted", "per_sequence", (26 + 4) / 2),
        # unshifted: row 0 t = 2, 3 (36, 64); row 1 t = 3 (16).
        ("unshifted", "per_token", 116 / 3),
        ("unshifted", "per_sequence", (50 + 16) / 2),
        # all positions, attention mask drops row 1's t = 0 (100): (120 + 20)/7; rows 30 and 20/3.
        ("all_positions", "per_token", 20.0),
        ("all_positions", "per_sequence", (30 + 20 / 3) / 2),
    ],
)
def test_flatten_hand_values_per_alignment_and_reduction(alignment, reduction, expected):
    """Rows of 2 and 1 scored positions: per_token weighs each position, per_sequence each row."""
    logits, labels = flatten_example()
    attention = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    loss = flatten_loss(
        logits, labels, mask_alignment=alignment, reduction=reduction, attention_mask=attention
    )
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_flatten_all_positions_without_attention_mask_scores_every_position():
    """All 8 positions: (4 + 16 + 36 + 64 + 100 + 0 + 4 + 16)/8 = 30."""
    logits, labels = flatten_example()
    loss = flatten_loss(logits, labels, mask_alignment="all_positions", reduction="per_token")
    torch.testing.assert_close(loss, torch.tensor(30.0))


def test_flatten_unshifted_per_token_reproduces_open_unlearning_pdu():
    """open-unlearning's PDU: (max − mean)² over every position, masked by labels != -100, summed
    over the mask and divided by its size (written here independently in plain torch)."""
    logits = torch.randn(3, 7, 13)
    labels = torch.randint(0, 13, (3, 7))
    labels[:, :3] = IGN
    labels[2, 5:] = IGN
    flat = logits.reshape(-1, 13)
    per = (flat.max(-1).values - flat.mean(-1)) ** 2
    mask = (labels != IGN).reshape(-1)
    expected = (per * mask).sum() / mask.sum()
    got = flatten_loss(logits, labels, mask_alignment="unshifted", reduction="per_token")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reduction", ["per_token", "per_sequence"])
def test_flatten_gradient_matches_the_hand_derived_formula(reduction):
    """d/dz (max − mean)² = 2·(max − mean)·(onehot(argmax) − 1/V), times the position's share of the
    mean: 1/K for per_token (K scored positions), 1/(rows·len_row) for per_sequence."""
    z = torch.randn(2, 5, 6)
    labels = torch.tensor([[IGN, IGN, 1, 2, 3], [IGN, IGN, IGN, 4, IGN]])
    logits = z.clone().requires_grad_(True)
    flatten_loss(logits, labels, reduction=reduction).backward()

    scored = labels[:, 1:] != IGN  # shifted: logits[:, :-1]
    zs = z[:, :-1]
    margin = zs.max(-1).values - zs.mean(-1)
    direction = F.one_hot(zs.argmax(-1), 6).float() - 1 / 6
    share = (
        torch.full_like(margin, 1 / scored.sum().item())
        if reduction == "per_token"
        else 1 / (2 * scored.sum(-1, keepdim=True).float()).expand_as(margin)
    )
    expected = torch.zeros_like(z)
    expected[:, :-1] = (2 * margin * share * scored).unsqueeze(-1) * direction
    torch.testing.assert_close(logits.grad, expected)


def test_flatten_is_exactly_zero_with_zero_gradient_when_scored_logits_are_equal():
    """Each scored position has V equal logits (values like 0.1 whose float mean is inexact);
    unscored positions are random. Loss and gradient must be exactly 0, not merely small."""
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGN, IGN, 1, 2, 3], [IGN, IGN, IGN, 4, IGN]])
    for b, t, value in [(0, 1, 0.1), (0, 2, -3.3), (0, 3, 7.77), (1, 2, 0.3)]:
        logits[b, t] = value
    for reduction in ("per_token", "per_sequence"):
        x = logits.clone().requires_grad_(True)
        loss = flatten_loss(x, labels, reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.count_nonzero(x.grad) == 0


def test_flatten_weight_scales_and_bad_alignment_raises():
    logits, labels = flatten_example()
    torch.testing.assert_close(flatten_loss(logits, labels, weight=2.5), 2.5 * flatten_loss(logits, labels))
    with pytest.raises(ValueError, match="mask_alignment"):
        flatten_loss(logits, labels, mask_alignment="shift")
    with pytest.raises(ValueError, match="reduction"):
        flatten_loss(logits, labels, reduction="mean")


ALL_MASKED_LOSSES = {
    "npo": lambda lo, la: npo_loss(lo, la, lo.detach()),
    "simnpo": lambda lo, la: simnpo_loss(lo, la),
    "idk_dpo": lambda lo, la: idk_dpo_loss(lo, la, lo.detach(), lo, la, lo.detach()),
    "idk_nll": lambda lo, la: idk_nll_loss(lo, la),
    "undial": lambda lo, la: undial_loss(lo, lo.detach(), la),
    "ceu": lambda lo, la: ceu_loss(lo, la),
    "wga": lambda lo, la: wga_loss(lo, la),
    "satimp": lambda lo, la: satimp_loss(lo, la),
    "flatten_seq": lambda lo, la: flatten_loss(lo, la),
    "flatten_tok": lambda lo, la: flatten_loss(lo, la, reduction="per_token", mask_alignment="unshifted"),
    "rmu_forget": lambda lo, la: rmu_forget_loss(lo, answer_mask(la), torch.ones(lo.shape[-1])),
    "rmu_retain": lambda lo, la: rmu_retain_loss(lo, lo.detach() + 1, answer_mask(la)),
}


@pytest.mark.parametrize("name", sorted(ALL_MASKED_LOSSES))
def test_all_masked_forget_losses_are_zero_with_finite_gradient(name):
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGN)
    loss = ALL_MASKED_LOSSES[name](logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


TOKEN_WEIGHTED = {
    "idk_nll": lambda lo, la, w: idk_nll_loss(lo, la, token_weight=w),
    "undial": lambda lo, la, w: undial_loss(lo, lo.flip(-1), la, token_weight=w),
    "ceu": lambda lo, la, w: ceu_loss(lo, la, token_weight=w),
    "wga": lambda lo, la, w: wga_loss(lo, la, token_weight=w),
    "satimp": lambda lo, la, w: satimp_loss(lo, la, token_weight=w),
    "rmu_forget": lambda lo, la, w: rmu_forget_loss(lo, answer_mask(la), torch.ones(7), token_weight=w),
    "rmu_retain": lambda lo, la, w: rmu_retain_loss(lo, lo.flip(-1), answer_mask(la), token_weight=w),
    "npo": lambda lo, la, w: npo_loss(lo, la, lo.flip(-1), seq_weight=w),
    "simnpo": lambda lo, la, w: simnpo_loss(lo, la, seq_weight=w),
    "idk_dpo": lambda lo, la, w: idk_dpo_loss(lo, la, lo.flip(-1), lo.flip(1), la, lo, seq_weight=w),
}


@pytest.mark.parametrize("name", sorted(TOKEN_WEIGHTED))
def test_accumulation_weight_scales_the_loss(name):
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGN, IGN, 1, 2, 3], [IGN, 4, 5, 6, IGN]])
    one = TOKEN_WEIGHTED[name](logits, labels, 1.0)
    assert one != 0
    torch.testing.assert_close(TOKEN_WEIGHTED[name](logits, labels, 3.0), 3 * one)
