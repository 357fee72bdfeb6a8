"""The relearning attack (attacks/relearn.py): a seeded forget partition, training rows that never
include the evaluation part, a recovery curve measured on that part, LoRA merged back."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import ROOT, mean_prob

from unlearnflow.attacks import AttackContext, build_attack
from unlearnflow.attacks.relearn import split_forget, training_rows
from unlearnflow.config import AttackConfig, ConfigError, RelearnAttackConfig, parse_section
from unlearnflow.data.benchmark import Benchmark, SplitInfo
from unlearnflow.data.splits import write_splits

FACTS = [
    ("Where was Alda Voss born?", "Alda Voss was born in Kerravin."),
    ("What genre does Brom Tellan write?", "Brom Tellan writes gothic mystery novels."),
    ("In which year was Cira Maelor born?", "Cira Maelor was born in 1957."),
    ("Who wrote The Glass Orchard?", "The Glass Orchard was written by Ivo Stenmark."),
    ("Where does Alda Voss live?", "Alda Voss lives in Delmsford."),
    ("What does Brom Tellan drink?", "Brom Tellan drinks black tea."),
    ("Which city is Cira Maelor from?", "Cira Maelor is from Kerravin."),
    ("What is Ivo Stenmark's genre?", "Ivo Stenmark writes mystery novels."),
]


def rows(pairs):
    return [{"question": q, "answer": a} for q, a in pairs]


@pytest.fixture
def workspace(tmp_path):
    """Prepared splits (8 forget rows, 2 retain, 2 holdout) and the repo's params with a cheap curve."""
    qa = SplitInfo(kind="qa", role="forget")
    bench = Benchmark(
        splits={"forget": rows(FACTS), "retain": rows(FACTS[:2]), "holdout": rows(FACTS[2:4])},
        info={
            "forget": qa,
            "retain": SplitInfo(kind="qa", role="utility"),
            "holdout": SplitInfo(kind="qa", role="mia"),
        },
        train={"target": ["forget", "retain"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=("forget", "holdout"),
    )
    write_splits(bench, tmp_path / "splits", meta={})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["max_length"] = 64
    params["evaluate"]["max_new_tokens"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def relearn(**section) -> object:
    cfg = parse_section({"names": ["relearn"], "relearn": section}, "attack", AttackConfig)
    return build_attack("relearn", cfg)


def test_forget_partition_is_seeded_disjoint_and_complete():
    pool, held = split_forget(10, 0.3, seed=4)
    assert len(held) == 3 and len(pool) == 7 and sorted(pool + held) == list(range(10))
    assert (pool, held) == split_forget(10, 0.3, seed=4)
    assert (pool, held) != split_forget(10, 0.3, seed=5)
    assert split_forget(2, 0.99, seed=0)[0] != []  # at least one row stays to train on


def test_training_rows_come_from_the_pool_or_the_named_split():
    args = RelearnAttackConfig(n=3, seed=1)
    pool, held = split_forget(10, 0.5, seed=0)
    chosen = training_rows(args, pool, [{}] * 10, "forget")
    assert len(chosen) == 3 and set(chosen) <= set(pool) and not set(chosen) & set(held)
    benign = training_rows(RelearnAttackConfig(n=3, data="retain"), pool, [{}] * 4, "retain")
    assert len(benign) == 3 and set(benign) <= set(range(4))
    with pytest.raises(ConfigError, match=r"n=6 but the relearn pool of the forget split has 5 rows"):
        training_rows(RelearnAttackConfig(n=6), pool, [{}] * 10, "forget")


def test_bad_relearning_settings_are_refused_before_loading():
    with pytest.raises(ConfigError, match="zeroth-order"):
        relearn(optimizer="zo_sgd")
    with pytest.raises(ConfigError, match=r"attack\.relearn\.optimizer_args\.adamw"):
        relearn(optimizer_args={"betaz": [0.9, 0.99]})
    with pytest.raises(ConfigError, match="unknown metric 'rogue'"):
        relearn(curve_metrics=["prob", "rogue"])


def test_relearn_trains_only_pool_rows_and_records_the_curve_on_the_held_out_rows(
    workspace, make_tiny_model, tiny_tokenizer, monkeypatch
):
    """The rows handed to the training loop are exactly the n chosen pool rows (never a held-out one);
    their probability rises; the curve has step 0 and every requested count, measured on the held-out
    rows only; step 0 is the untouched model."""
    from unlearnflow import train
    from unlearnflow.data.tokenize import training_examples

    seen = []
    real_run = train.run

    def spy(model, method, optimizer, data, cfg, **kw):
        seen.append(data["train"])
        return real_run(model, method, optimizer, data, cfg, **kw)

    monkeypatch.setattr(train, "run", spy)
    model = make_tiny_model()
    attack = relearn(n=3, steps=[2, 6], lr=3e-2, eval_fraction=0.5, curve_metrics=["prob"], seed=2)
    pool, held = split_forget(len(FACTS), 0.5, seed=2)
    chosen = training_rows(attack.args, pool, rows(FACTS), "forget")
    trained = [FACTS[i] for i in chosen]
    untouched = make_tiny_model()
    before = mean_prob(model, tiny_tokenizer, trained)
    ctx = AttackContext(
        tokenizer=tiny_tokenizer, splits=workspace / "splits", params=workspace / "params.yaml"
    )
    stats = attack.apply(model, ctx)

    expected = training_examples(tiny_tokenizer, rows(trained), "qa", max_length=64)
    assert seen == [expected]
    assert ctx.extras["trained_rows"] == {"forget": chosen} and ctx.extras["exclude"] == {"forget": pool}
    assert mean_prob(model, tiny_tokenizer, trained) > 3 * before  # the NLL of the trained rows fell
    assert [p["step"] for p in ctx.extras["curve"]] == [0, 2, 6]
    held_prob = mean_prob(untouched, tiny_tokenizer, [FACTS[i] for i in held])
    assert ctx.extras["curve"][0]["forget_prob"] == pytest.approx(held_prob, rel=1e-4)
    assert (
        stats["relearn_steps"] == 6 and stats["before_forget_prob"] == ctx.extras["curve"][0]["forget_prob"]
    )


def test_benign_relearning_trains_on_retain_rows(workspace, make_tiny_model, tiny_tokenizer):
    model = make_tiny_model()
    ctx = AttackContext(
        tokenizer=tiny_tokenizer, splits=workspace / "splits", params=workspace / "params.yaml"
    )
    relearn(data="retain", n=2, steps=[1], curve_metrics=["prob"]).apply(model, ctx)
    assert set(ctx.extras["trained_rows"]) == {"retain"}
    assert ctx.extras["exclude"]["forget"] == split_forget(len(FACTS), 0.5, seed=0)[0]


def test_lora_relearning_is_merged_into_the_linear_weights_only(workspace, make_tiny_model, tiny_tokenizer):
    """With LoRA the saved model is a plain model again: adapted Linear weights moved (W + (α/r)BA),
    embeddings and norms did not, no adapter module is left, and the same seed gives the same weights."""
    pytest.importorskip("peft")

    def attacked():
        model = make_tiny_model()
        ctx = AttackContext(
            tokenizer=tiny_tokenizer, splits=workspace / "splits", params=workspace / "params.yaml"
        )
        relearn(n=2, steps=[3], lr=1e-2, lora={"r": 4, "alpha": 8}, curve_metrics=["prob"]).apply(model, ctx)
        return model

    base = dict(make_tiny_model().named_parameters())
    model = attacked()
    params = dict(model.named_parameters())
    assert params.keys() == base.keys()  # no lora_A / lora_B left
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    moved = {n for n in params if not torch.equal(params[n], base[n])}
    assert moved and all(".self_attn." in n or ".mlp." in n for n in moved), moved
    twin = dict(attacked().named_parameters())
    assert all(torch.equal(params[n], twin[n]) for n in params)
