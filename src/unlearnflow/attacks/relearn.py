"""The relearning attack: fine-tune on a few examples, measure how much forgotten knowledge returns.

ALGORITHMS.md §4 ``relearn``. Public protocols differ in scale (full fine-tuning at lr 1e-5 for
50–150 steps on MUSE/WMDP; LoRA at lr 2e-4 for 15–60 steps, Hu et al.'s adapters, on TOFU), not in
shape: train on n examples with the shared loop, then evaluate on forget queries that were never
trained on. Here the forget split is cut once (seeded) into an evaluation part and a relearn pool;
``data: forget`` trains on n pool rows, ``retain`` / ``holdout`` on n rows of that split ("benign"
relearning: related, different data). Whatever the data, the evaluation part is the same, so the
recovery curves of every model and every data choice are measured on the same queries; the pool
(every row of it, trained on or not) is excluded from the attacked model's forget metrics
(the ``attack`` stage passes ``extras["exclude"]`` to its evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from unlearnflow.attacks import ATTACKS, AttackContext
from unlearnflow.config import (
    EvaluateConfig,
    ModelConfig,
    RelearnAttackConfig,
    Section,
    TrainConfig,
    load_section,
)
from unlearnflow.errors import ConfigError, DataError, UnlearnflowError

log = logging.getLogger(__name__)


def split_forget(n_rows: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(relearn pool, evaluation part): a seeded partition of ``range(n_rows)``, both sorted.

    The evaluation part holds ``round(eval_fraction · n_rows)`` rows, at least one, and leaves at
    least one row in the pool. A fresh ``np.random.default_rng(seed)``: the same partition for
    every model attacked with one seed (the unlearned models, the target and the oracle).
    """
    if n_rows < 2:
        raise DataError(
            f"the forget split has {n_rows} row(s): relearning needs one to train and one to test"
        )
    n_eval = min(n_rows - 1, max(1, round(eval_fraction * n_rows)))
    order = np.random.default_rng(seed).permutation(n_rows)
    return sorted(int(i) for i in order[n_eval:]), sorted(int(i) for i in order[:n_eval])


def training_rows(
    args: RelearnAttackConfig, pool: Sequence[int], split_rows: Sequence[dict], split: str
) -> list[int]:
    """The ``args.n`` row indices relearning trains on: pool rows (``data: forget``) or rows of
    ``split`` (retain / holdout), drawn with ``args.seed``; fewer available than n is an error."""
    candidates = list(pool) if args.data == "forget" else list(range(len(split_rows)))
    if args.n > len(candidates):
        where = "the relearn pool of the forget split" if args.data == "forget" else f"split {split!r}"
        raise ConfigError(
            f"attack relearn: n={args.n} but {where} has {len(candidates)} rows "
            "(lower n, or eval_fraction for data: forget)"
        )
    rng = np.random.default_rng([args.seed, 1])  # another stream than the partition's
    return sorted(int(candidates[i]) for i in rng.choice(len(candidates), size=args.n, replace=False))


def _with_lora(model: torch.nn.Module, args: RelearnAttackConfig) -> torch.nn.Module:
    """``model`` wrapped with LoRA adapters (peft), every base weight frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UnlearnflowError("attack relearn: lora needs the peft package (pip install peft)") from None
    assert args.lora is not None
    torch.manual_seed(args.seed)  # the adapters' A matrices are drawn from the global generator
    cfg = LoraConfig(
        r=args.lora.r,
        lora_alpha=args.lora.alpha,
        lora_dropout=args.lora.dropout,
        target_modules=args.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def _merge_into(model: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    """Fold the trained adapters into ``model``'s own weights (W ← W + (alpha/r)·BA), in place."""
    merged = peft_model.merge_and_unload()
    if merged is not model:  # peft unwraps to the same module object; copy if a version does not
        model.load_state_dict(merged.state_dict())


@ATTACKS.register("relearn")
class RelearnAttack:
    """Fine-tune on n examples with the shared loop; record the forget metrics on the held-out part."""

    Args: ClassVar[type[Section]] = RelearnAttackConfig
    modifies_weights: ClassVar[bool] = True

    def __init__(self, args: RelearnAttackConfig) -> None:
        from unlearnflow.metrics.split_metrics import check_metric_names
        from unlearnflow.optim import parse_optimizer_args

        check_metric_names(args.curve_metrics)

        # Before any model loads: an unknown optimizer, a bad argument or a gradient-free one.
        spec, _ = parse_optimizer_args(
            args.optimizer, args.optimizer_args, key="attack.relearn.optimizer_args"
        )
        if spec.zeroth_order:
            raise ConfigError(
                f"attack relearn: optimizer {args.optimizer!r} is zeroth-order; relearning uses a first-order one"
            )
        self.args = args

    def apply(self, model: torch.nn.Module, ctx: AttackContext) -> dict[str, float]:
        from unlearnflow import train
        from unlearnflow.data import splits as split_io
        from unlearnflow.data.tokenize import PromptFormat, training_examples
        from unlearnflow.methods import build_method
        from unlearnflow.metrics import SuiteOptions, evaluate_splits

        a = self.args
        if ctx.splits is None or ctx.params is None or ctx.tokenizer is None:
            raise UnlearnflowError("attack relearn needs the splits, the params file and the tokenizer")
        model_cfg = load_section(ctx.params, "model", ModelConfig)
        eval_cfg = load_section(ctx.params, "evaluate", EvaluateConfig)
        layout = split_io.read_layout(ctx.splits)
        forget = layout.unlearn["forget"]
        source = {"forget": forget, "retain": layout.unlearn.get("retain"), "holdout": _holdout(layout)}[
            a.data
        ]
        if source is None:
            raise DataError(f"attack relearn: data {a.data!r} but this benchmark has no such split")
        rows = split_io.read_splits(ctx.splits, list(dict.fromkeys([forget, source])))
        pool, _ = split_forget(len(rows[forget]), a.eval_fraction, a.seed)
        chosen = training_rows(a, pool, rows[source], source)
        fmt = PromptFormat(**model_cfg.prompt_kwargs())
        encoded = training_examples(
            ctx.tokenizer,
            [rows[source][i] for i in chosen],
            layout.info[source].kind,
            max_length=model_cfg.max_length,
            fmt=fmt,
            split=source,
        )
        opts = SuiteOptions(
            **eval_cfg.suite_options(model_cfg.max_length), prompt=fmt, exclude={forget: frozenset(pool)}
        )
        curve_layout = dataclasses.replace(
            layout, info={forget: layout.info[forget]}, mia=None, forget_quality=None
        )

        def point(step: int) -> dict[str, Any]:
            result = evaluate_splits(
                model, ctx.tokenizer, {forget: rows[forget]}, curve_layout,
                metrics=a.curve_metrics, device=ctx.device, opts=opts,
            )  # fmt: skip
            values = {k: v for k, v in result.aggregates.items() if k.startswith(f"{forget}_")}
            log.info("relearn step %d: %s", step, values)
            return {"step": step, **values}

        curve = [point(0)]
        cfg = TrainConfig(
            epochs=1,
            batch_size=a.batch_size,
            lr=a.lr,
            weight_decay=a.weight_decay,
            max_grad_norm=1.0,
            seed=a.seed,
        )
        trained = _with_lora(model, a) if a.lora is not None else model
        marks = set(a.steps)
        result = train.run(
            trained,
            build_method("sft", key="attack.relearn"),
            a.optimizer,
            {"train": encoded},
            cfg,
            pad_token_id=ctx.tokenizer.pad_token_id,
            device=ctx.device,
            optimizer_args=a.optimizer_args,
            optimizer_key="attack.relearn.optimizer_args",
            max_steps=a.steps[-1],
            on_step=lambda s: curve.append(point(s)) if s in marks else None,
            desc="relearn",
        )
        if a.lora is not None:
            _merge_into(model, trained)
        if result.health:
            log.warning("relearn run unhealthy: %s", "; ".join(result.health))
        ctx.extras.update(
            exclude={forget: pool},
            curve=curve,
            trained_rows={source: chosen},
            final_loss=result.rows[-1]["loss"] if result.rows else None,
        )
        first, last = curve[0], curve[-1]
        stats = {"relearn_steps": float(result.steps), "relearn_rows": float(len(chosen))}
        stats |= {f"before_{k}": float(v) for k, v in first.items() if k != "step"}
        stats |= {f"after_{k}": float(v) for k, v in last.items() if k != "step"}
        return stats


def _holdout(layout: Any) -> str | None:
    """The benchmark's non-member split (TOFU's holdout authors), if any."""
    return layout.mia[1] if layout.mia else None
