"""The one training loop: steps move parameters, unlearning forgets, accumulation and seeds are exact."""

from __future__ import annotations

import pytest
import torch

from unlearnflow import train
from unlearnflow.config import TrainConfig
from unlearnflow.data.tokenize import collate, encode_qa
from unlearnflow.losses import sequence_nll
from unlearnflow.methods import METHODS, build_method

CPU = torch.device("cpu")
FORGET = [
    ("Where was Alda Voss born?", "Alda Voss was born in Kerravin."),
    ("What genre does Brom Tellan write?", "Brom Tellan writes gothic mystery novels."),
]
RETAIN = [
    ("In which year was Cira Maelor born?", "Cira Maelor was born in 1957."),
    ("Who wrote The Glass Orchard?", "The Glass Orchard was written by Ivo Stenmark."),
]


def encode(tok, pairs):
    return [encode_qa(tok, q, a, max_length=64) for q, a in pairs]


def mean_prob(model, tok, pairs) -> float:
    """exp(−avgNLL) averaged over pairs: the TOFU `prob` of these answers."""
    batch = collate(encode(tok, pairs), tok.pad_token_id)
    with torch.no_grad():
        seq, n = sequence_nll(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
    return float(torch.exp(-seq / n).mean())


def streams(tok):
    enc_f, enc_r = encode(tok, FORGET), encode(tok, RETAIN)
    return {"train": enc_f + enc_r, "forget": enc_f, "retain": enc_r}


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
    for n, p in tiny_model.named_parameters():
        assert not torch.equal(before[n], p.detach()), f"{name}: {n} did not move"


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


def run_sft(tok, model, *, batch_size: int, accum: int, seed: int = 0):
    cfg = TrainConfig(
        epochs=1, batch_size=batch_size, grad_accum_steps=accum, lr=1e-2, max_grad_norm=None, seed=seed
    )
    data = {"train": encode(tok, FORGET + RETAIN)}
    return train.run(model, build_method("sft"), "sgd", data, cfg, pad_token_id=tok.pad_token_id, device=CPU)


def test_accumulation_equals_a_bigger_batch(tiny_tokenizer, make_tiny_model):
    """Batch 4 × accumulation 1 and batch 2 × accumulation 2 take the same SGD step.

    With one step over all 4 examples both see the same examples; the loop's token weights make the
    accumulated loss the token mean of all 4 answers rather than a mean of two micro-batch means.
    """
    a, b = make_tiny_model(), make_tiny_model()
    ra = run_sft(tiny_tokenizer, a, batch_size=4, accum=1)
    rb = run_sft(tiny_tokenizer, b, batch_size=2, accum=2)
    assert ra.steps == rb.steps == 1
    assert ra.rows[0]["loss"] == pytest.approx(rb.rows[0]["loss"], rel=1e-5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{n} differs")


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
