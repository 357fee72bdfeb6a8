"""TOFU (Maini et al. 2024, arXiv:2401.06121) from a hub id or a local copy.

TOFU is 200 fictitious authors × 20 question-answer pairs; ``forgetNN`` holds the last NN% of the
authors and ``retainMM`` (MM = 100 − NN) the rest. The ``*_perturbed`` configs add a paraphrased
answer and perturbed (wrong) answers per question, which the truth ratio and hence forget quality
need; a copy without them still gives a usable benchmark, only without forget quality.

Splits (name: config → kind, role), ``NN`` from ``benchmark.split``:

* ``forget``: ``forgetNN_perturbed``, else ``forgetNN`` → qa, forget
* ``retain``: ``tofu.retain_eval`` (``retain_perturbed``) → qa, utility
* ``holdout``: ``holdoutNN``, optional → qa, mia
* ``real_authors`` / ``world_facts``: ``*_perturbed``, optional → options, utility
* ``retain_train``: ``retainMM`` → qa, train

The target fine-tunes on forget + retain_train (together ``full``), the oracle on retain_train.
"""

from __future__ import annotations

import logging
from typing import Any

from unlearnflow.config import BenchmarkConfig
from unlearnflow.data.benchmark import Benchmark, SplitInfo
from unlearnflow.data.sources import qa_rows, read_optional, read_required

logger = logging.getLogger(__name__)

# Optional utility splits: name -> config.
UTILITY_CONFIGS = {"real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}


def load(cfg: BenchmarkConfig) -> Benchmark:
    """Read TOFU from ``cfg.source`` into a ``Benchmark`` (see the module docstring for the splits).

    Raises:
        UnlearnflowError: a required config (forget, ``tofu.retain_eval``, retainMM) is missing, or
            its rows lack question/answer columns.
    """
    assert cfg.source is not None  # guaranteed by BenchmarkConfig's validator
    source = cfg.source
    nn = f"{cfg.forget_percent:02d}"
    mm = f"{100 - cfg.forget_percent:02d}"
    configs: dict[str, str] = {}
    splits: dict[str, list[dict[str, Any]]] = {}
    info: dict[str, SplitInfo] = {}

    def add(name: str, config: str, rows: list[dict[str, Any]], kind: str, role: str) -> None:
        splits[name] = qa_rows(rows, f"tofu {config}")
        info[name] = SplitInfo(kind, role)
        configs[name] = config

    forget_config = f"forget{nn}_perturbed"
    forget = read_optional(source, forget_config)
    if forget is None:
        forget_config = f"forget{nn}"
        forget = read_required(source, forget_config, who="tofu", instead_of=f"forget{nn}_perturbed")
    add("forget", forget_config, forget, "qa", "forget")
    add(
        "retain",
        cfg.tofu.retain_eval,
        read_required(source, cfg.tofu.retain_eval, who="tofu"),
        "qa",
        "utility",
    )

    holdout = read_optional(source, f"holdout{nn}")
    if holdout is not None:
        add("holdout", f"holdout{nn}", holdout, "qa", "mia")
    for name, config in UTILITY_CONFIGS.items():
        rows = read_optional(source, config)
        if rows is not None:
            add(name, config, rows, "options", "utility")
    add("retain_train", f"retain{mm}", read_required(source, f"retain{mm}", who="tofu"), "qa", "train")

    skipped = [c for c in (f"holdout{nn}", *UTILITY_CONFIGS.values()) if c not in configs.values()]
    if skipped:
        logger.warning("tofu: %s not found in %s; those splits are left out", ", ".join(skipped), source)
    has_truth_ratio = all("paraphrased_answer" in r and "perturbed_answer" in r for r in splits["forget"])
    return Benchmark(
        splits=splits,
        info=info,
        train={"target": ["forget", "retain_train"], "oracle": ["retain_train"]},
        unlearn={"forget": "forget", "retain": "retain_train"},
        mia=("forget", "holdout") if "holdout" in splits else None,
        forget_quality="forget" if has_truth_ratio else None,
        meta={
            "benchmark": "tofu",
            "source": source,
            "configs": configs,
            "counts": {n: len(r) for n, r in splits.items()},
            "skipped": skipped,
        },
    )
