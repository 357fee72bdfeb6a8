"""The pipeline's DVC metrics (src/unlearnflow/headline.py): a few numbers per model group."""

from __future__ import annotations

import math

from unlearnflow.headline import group_name, headline, is_headline


def _group(model: str, method=None, optimizer=None, attack=None, **mean: float) -> dict:
    return {"model": model, "method": method, "optimizer": optimizer, "attack": attack, "mean": mean}


def test_only_headline_metrics_metric_first_nan_left_out() -> None:
    groups = [
        _group("target", forget_prob=0.99, forget_rouge=0.9, model_utility=0.6, mia_loss=0.8),
        _group("unlearned", "npo", "adamw", "none", forget_prob=0.1, model_utility=math.nan),
        _group("unlearned", "npo", "adamw", "quantize_4bit", forget_prob=0.12, facts_leaked=3.0),
    ]
    controls = [
        {
            "model": "target",
            "method": None,
            "optimizer": None,
            "attack": "relearn",
            "seed": None,
            "health": None,
            "forget_prob": 1.0,
            "knowmem_forget_knowmem": 0.5,
        }
    ]
    assert headline(groups, controls, baseline="none") == {
        "facts_leaked": {"npo-adamw-quantize_4bit": 3.0},
        "forget_prob": {
            "npo-adamw": 0.1,
            "npo-adamw-quantize_4bit": 0.12,
            "target": 0.99,
            "target-relearn": 1.0,
        },
        "knowmem_forget_knowmem": {"target-relearn": 0.5},
        "model_utility": {"target": 0.6},
    }


def test_group_names() -> None:
    assert group_name(_group("oracle"), "none") == "oracle"
    assert group_name(_group("unlearned", "pdu", "zo_adam", "none"), "none") == "pdu-zo_adam"
    assert group_name(_group("unlearned", "pdu", "zo_adam", "relearn"), "none") == "pdu-zo_adam-relearn"
    assert group_name(_group("target", attack="quantize_4bit"), None) == "target-quantize_4bit"


def test_headline_selection() -> None:
    assert is_headline("forget_quality") and is_headline("wmdp-bio_mcq_accuracy")
    assert not is_headline("forget_rouge") and not is_headline("mia_zlib") and not is_headline("facts_total")
