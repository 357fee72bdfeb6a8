"""The one training loop: steps move parameters, unlearning forgets, accumulation and seeds are exact."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import FORGET, RETAIN, encode, mean_prob

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.data.tokenize import collate
from unlearnflow.losses import sequence_nll
from unlearnflow.methods import METHODS, build_method

CPU = torch.device("cpu")


# The forget questions with refusal answers, row for row (the "idk" stream of idk_dpo / idk_nll).
IDK = [(q, "I'm not sure I know that.") for q, _ in FORGET]


def streams(tok):
    enc_f, enc_r = encode(tok, FORGET), encode(tok, RETAIN)
    return {"train": enc_f + enc_r, "forget": enc_f, "retain": enc_r, "idk": encode(tok, IDK)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_step_moves_every_trainable_parameter(name, tiny_model, tiny_tokenizer):
    # lr 0.01 rather than a realistic 1e-5: tiny gradients on a tiny model could leave a
    # parameter numerically unchanged after one step.
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-2, max_grad_norm=None)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    result = train.run(
        tiny_model,
        build_method(name),
        "adamw",
        streams(tiny_tokenizer),
        cfg,
        pad_token_id=tiny_tokenizer.pad_token_id,
        device=CPU,
    )
    assert result.steps >= 1 and result.rows
    # A method may train chosen layers only (rmu): those move, the frozen ones stay exactly as they were.
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable, f"{name}: nothing trained"
    for n, p in tiny_model.named_parameters():
        if n in trainable:
            assert not torch.equal(before[n], p.detach()), f"{name}: {n} did not move"
        else:
            assert torch.equal(before[n], p.detach()), f"{name}: frozen {n} moved"


def test_grad_ascent_lowers_forget_prob(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    sft = TrainConfig(epochs=40, batch_size=4, lr=1e-2)
    train.run(
        tiny_model, build_method("sft"), "adamw", streams(tok), sft, pad_token_id=tok.pad_token_id, device=CPU
    )
    learned = mean_prob(tiny_model, tok, FORGET)
    assert learned > 0.3, "the tiny model should first learn the forget answers"
    ga = TrainConfig(epochs=5, batch_size=2, lr=5e-3)
    train.run(
        tiny_model,
        build_method("grad_ascent"),
        "adamw",
        streams(tok),
        ga,
        pad_token_id=tok.pad_token_id,
        device=CPU,
    )
    assert mean_prob(tiny_model, tok, FORGET) < 0.5 * learned


# Answers of very different lengths, so that however the sampler pairs them into two micro-batches
# the micro-batches hold different numbers of answer tokens (asserted in the test).
ACCUM = [
    ("Where was Alda Voss born?", "Kerravin."),
    ("What genre does Brom Tellan write?", "Brom Tellan writes gothic mystery novels."),
    ("In which year was Cira Maelor born?", "1957."),
    (
        "Who wrote The Glass Orchard?",
        "Ivo Stenmark wrote The Glass Orchard, a gothic mystery novel, in 1957 in Delmsford.",
    ),
]


def run_sft(tok, model, *, batch_size: int, accum: int, seed: int = 0):
    cfg = TrainConfig(
        epochs=1, batch_size=batch_size, grad_accum_steps=accum, lr=1e-2, max_grad_norm=None, seed=seed
    )
    data = {"train": encode(tok, ACCUM)}
    return train.run(model, build_method("sft"), "sgd", data, cfg, pad_token_id=tok.pad_token_id, device=CPU)


def test_accumulation_equals_a_bigger_batch(tiny_tokenizer, make_tiny_model):
    """Batch 4 × accumulation 1 and batch 2 × accumulation 2 take the same SGD step.

    With answer-token counts n_i and per-answer summed NLLs s_i, micro-batches A, B (|A| = |B| = 2)
    hold N_A = Σ_A n_i ≠ N_B tokens. The loop weights micro-batch m by w_m = N_m / (N/2), N = N_A + N_B,
    and averages: ½(w_A·Σ_A s_i/N_A + w_B·Σ_B s_i/N_B) = Σ_i s_i / N, the token mean of the full
    batch. A plain mean of micro-batch means, ½(Σ_A s_i/N_A + Σ_B s_i/N_B), differs from it whenever
    N_A ≠ N_B (and the two means differ), so the counts are checked unequal for all three pairings.
    The loss of the single step is computed at the starting weights; it must equal Σ s_i / N from
    ``sequence_nll``, and the two runs must end with the same weights.
    """
    tok = tiny_tokenizer
    n = [sum(label != -100 for label in ex["labels"][1:]) for ex in encode(tok, ACCUM)]
    for pair in ((0, 1), (0, 2), (0, 3)):  # example 0 with each partner: every split into 2 + 2
        rest = [i for i in range(4) if i not in pair]
        assert sum(n[i] for i in pair) != sum(n[i] for i in rest), f"equal token counts {n} for {pair}"
    a, b = make_tiny_model(), make_tiny_model()
    batch = collate(encode(tok, ACCUM), tok.pad_token_id)
    with torch.no_grad():
        seq, count = sequence_nll(
            a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
    assert count.tolist() == n
    token_mean = float(seq.sum() / count.sum())
    ra = run_sft(tok, a, batch_size=4, accum=1)
    rb = run_sft(tok, b, batch_size=2, accum=2)
    assert ra.steps == rb.steps == 1
    assert ra.rows[0]["loss"] == pytest.approx(token_mean, rel=1e-5)
    assert rb.rows[0]["loss"] == pytest.approx(token_mean, rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_same_seed_same_numbers(tiny_tokenizer, make_tiny_model):
    def once(seed: int):
        m = make_tiny_model()
        cfg = TrainConfig(epochs=3, batch_size=2, lr=1e-2, seed=seed)
        rows = train.run(
            m,
            build_method("sft"),
            "adamw",
            {"train": encode(tiny_tokenizer, FORGET + RETAIN)},
            cfg,
            pad_token_id=tiny_tokenizer.pad_token_id,
            device=CPU,
        ).rows
        return [r["loss"] for r in rows], m

    (l1, m1), (l2, m2), (l3, _) = once(0), once(0), once(1)
    assert l1 == l2
    assert l1 != l3, "a different data-order seed gives a different trajectory"
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", [0.5, 1.0, 1.0, 1.0]), ("linear", [0.5, 1.0, 1.0, 0.5]), ("cosine", [0.5, 1.0, 1.0, 0.5])],
)
def test_lr_schedule(schedule, expected):
    """warmup 2, total 4: steps 0, 1 ramp (s+1)/2 = ½, 1; then progress p = (s−2)/2 = 0, ½.

    constant → 1, 1; linear 1−p → 1, ½; cosine ½(1+cos πp) → 1, ½.
    """
    got = [train.lr_factor(s, warmup=2, total=4, schedule=schedule) for s in range(4)]
    assert got == pytest.approx(expected)


def test_missing_stream_is_a_clear_error(tiny_model, tiny_tokenizer):
    from unlearnflow.errors import UnlearnflowError

    cfg = TrainConfig(epochs=1, batch_size=2)
    with pytest.raises(UnlearnflowError, match="retain"):
        train.run(
            tiny_model,
            build_method("grad_diff"),
            "adamw",
            {"forget": encode(tiny_tokenizer, FORGET)},
            cfg,
            pad_token_id=tiny_tokenizer.pad_token_id,
            device=CPU,
        )


def _trace(key: str, values: list[float]) -> list[dict[str, float]]:
    return [{key: v} for v in values]


def test_health_flags_by_hand():
    """Thresholds on hand-made traces, V = 100 so ln V = 4.605.

    * stalled: grad norm ≤ 1e-12 on ≥ max(5, ⌈10%·N⌉) steps, or on all N < 5 steps.
      N = 10, five zeros → 5 ≥ 5 flagged; four → not. N = 3, all zero → flagged. N = 60: ⌈6⌉ needed.
    * diverged: the mean of the last max(1, ⌈10%·N⌉) values of nll / retain_loss above
      2·max(first, ln V). nll 3 → … → 9.3 (N = 10, window 1): 9.3 > 2·4.605 = 9.21 flagged; 9.2 not.
      retain_loss (KL) from 0, N = 20, window 2: last (9.0, 9.5) → 9.25 > 9.21 flagged; a start of 5
      raises the bound to 10 → not; NaN at the end → flagged.
    * collapsed: forget NLL ending above 2·ln V = 9.21 (9.3 flagged, 9.2 not); skipped without V.
    """
    v = 100
    zeros = [1.0] * 5 + [0.0] * 5
    assert train.health_flags(_trace("grad_norm", zeros), vocab_size=v)[0].startswith(
        "stalled: gradient norm <= 1e-12 on 5 of 10 steps (first at step 6)"
    )
    assert train.health_flags(_trace("grad_norm", [1.0] * 6 + [1e-13] * 4), vocab_size=v) == []
    assert train.health_flags(_trace("grad_norm", [0.0] * 3), vocab_size=v)[0].startswith("stalled")
    assert train.health_flags(_trace("grad_norm", [1.0] * 55 + [0.0] * 5), vocab_size=v) == []
    assert train.health_flags(_trace("grad_norm", [1.0] * 54 + [0.0] * 6), vocab_size=v) != []

    ramp = [3.0, 2.5, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
    (flag,) = train.health_flags(_trace("nll", [*ramp, 9.3]), vocab_size=v)
    assert flag == "diverged: nll ended at 9.3 nats/token > 2·max(start 3, ln V 4.605) = 9.21"
    assert train.health_flags(_trace("nll", [*ramp, 9.2]), vocab_size=v) == []
    kl = [0.0] * 18
    assert train.health_flags(_trace("retain_loss", [*kl, 9.0, 9.5]), vocab_size=v)[0].startswith(
        "diverged: retain_loss ended at 9.25"
    )
    assert train.health_flags(_trace("retain_loss", [5.0, *kl[1:], 9.0, 9.5]), vocab_size=v) == []
    assert train.health_flags(_trace("nll", [3.0, float("nan")]), vocab_size=v) != []
    assert train.health_flags(_trace("loss", [3.0, 1e9]), vocab_size=v) == []  # the total is not read

    (flag,) = train.health_flags(_trace("forget_nll", [2.0, 9.3]), vocab_size=v)
    assert flag.startswith("collapsed: forget NLL ended at 9.3 nats/token > 2·ln V = 9.21")
    assert train.health_flags(_trace("forget_nll", [2.0, 9.2]), vocab_size=v) == []
    assert train.health_flags(_trace("forget_nll", [2.0, 1e6]), vocab_size=None) == []
    assert train.health_flags([], vocab_size=v) == []


@pytest.mark.parametrize(
    ("method", "optimizer", "lr", "epochs", "expected"),
    [
        # lr 1e6, 2 steps: the second step's loss is ~1e9 (sgd) and its gradient NaN, so the run
        # "finishes" with NaN weights; the non-finite-loss error would only fire on a third step.
        (
            "sft",
            "sgd",
            1e6,
            1,
            [r"diverged: nll ended at \S+e\+0\d", r"diverged: \d+ parameter tensors hold NaN"],
        ),
        ("sft", "adamw", 1e6, 1, [r"diverged: \d+ parameter tensors hold NaN"]),
        ("sft", "adamw", 1e-2, 1, []),  # a sane lr: healthy
        ("grad_diff", "adamw", 1e-2, 1, []),
        # pure gradient ascent, 8 steps at lr 0.03: forget NLL 5.77 (≈ ln V) → 13.9 > 2·ln V = 11.5
        (
            "grad_ascent",
            "adamw",
            3e-2,
            8,
            [r"collapsed: forget NLL ended at 1\d\.\d+ nats/token > 2·ln V = 11\.54"],
        ),
    ],
)
def test_unhealthy_runs_are_flagged(tiny_model, tiny_tokenizer, method, optimizer, lr, epochs, expected):
    tok = tiny_tokenizer
    cfg = TrainConfig(epochs=epochs, batch_size=2, lr=lr)
    result = train.run(
        tiny_model,
        build_method(method),
        optimizer,
        streams(tok),
        cfg,
        pad_token_id=tok.pad_token_id,
        device=CPU,
    )
    assert len(result.health) == len(expected), result.health
    for flag, pattern in zip(result.health, expected, strict=True):
        assert re.match(pattern, flag), result.health
