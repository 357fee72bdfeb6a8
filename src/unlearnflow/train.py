"""The one training loop: finetune, unlearn and (later) the relearn attack all run through ``run``.

It reads top to bottom: data loaders per stream → accelerator → optimizer and schedule → for each
optimizer step, fetch the step's micro-batches, build a closure over them, ``optimizer.step(closure)``.
The closure is the seam between the two axes of the matrix: the method defines what the closure
computes, the optimizer decides how often and at which weights to call it (once with backward for
first-order optimizers, under ``no_grad`` at perturbed weights for zeroth-order ones).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from unlearnflow.config import TrainConfig
from unlearnflow.data.tokenize import IGNORE_INDEX, collate
from unlearnflow.errors import ConfigError, UnlearnflowError
from unlearnflow.methods import Method
from unlearnflow.optim import build_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced besides the updated model."""

    steps: int
    rows: list[dict[str, float]] = field(default_factory=list)
    stopped_early: str | None = None
    wall_time: float = 0.0
    method_state: dict[str, Any] = field(default_factory=dict)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then constant, linear decay to 0, or cosine decay to 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loader(examples: Sequence[dict[str, list[int]]], batch_size: int, seed: int, pad_id: int) -> DataLoader:
    # An explicit generator per stream: the order depends on the seed only, not on global RNG use.
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        sampler=RandomSampler(examples, generator=gen),
        collate_fn=lambda rows: collate(rows, pad_id),
        drop_last=False,
    )


def _cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:  # a new shuffled epoch each time the stream runs out
        yield from loader


def _answer_tokens(sub: Mapping[str, torch.Tensor]) -> int:
    return int((sub["labels"][:, 1:] != IGNORE_INDEX).sum())


def run(
    model: torch.nn.Module,
    method: Method,
    optimizer: str,
    data: Mapping[str, Sequence[dict[str, list[int]]]],
    cfg: TrainConfig,
    *,
    pad_token_id: int,
    device: torch.device,
    optimizer_args: Mapping[str, Any] | None = None,
    optimizer_key: str = "unlearn.optimizer_args",
    divergence_limit: float | None = None,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place with ``method`` × ``optimizer`` on the encoded ``data`` streams.

    Args:
        model: the model to update (moved to ``device``).
        method: supplies the objective per micro-batch (``Method`` protocol).
        optimizer: registry name (``adamw``, ``sgd``, …).
        data: stream name → encoded examples (``encode_qa`` outputs); must hold ``method.streams``.
        cfg: epochs, batch size, accumulation, lr schedule, clipping, seed.
        pad_token_id: the tokenizer's pad id, for collation.
        device: where to train.
        optimizer_args: the optimizer's hyperparameters from params.yaml.
        divergence_limit: stop early once |loss| exceeds it (gradient ascent is unbounded).
        on_log: called with each logged row and its step (MLflow logging).
        desc: progress-bar label.

    Returns:
        A ``TrainResult`` with the per-step rows.

    Raises:
        UnlearnflowError: a missing stream, an empty stream, or a non-finite loss.
    """
    from accelerate import Accelerator

    missing = [s for s in method.streams if not data.get(s)]
    if missing:
        raise UnlearnflowError(
            f"no training data for stream(s) {missing}; the method needs {list(method.streams)}"
        )

    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=device.type == "cpu")
    model.to(accelerator.device)
    method.setup(model)
    opt, spec = build_optimizer(
        optimizer,
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        args=optimizer_args,
        key=optimizer_key,
    )
    if method.needs_grad and not spec.requires_grad:
        raise ConfigError(
            f"method {type(method).__name__} needs gradients; optimizer {optimizer!r} is gradient-free"
        )

    # The first stream sets the epoch; the others are sampled alongside it with their own seeds.
    loaders = [
        _loader(data[s], cfg.batch_size, cfg.seed + i, pad_token_id) for i, s in enumerate(method.streams)
    ]
    model, opt, *loaders = accelerator.prepare(model, opt, *loaders)
    streams = [_cycle(dl) for dl in loaders]
    steps_per_epoch = max(1, math.ceil(len(loaders[0]) / cfg.grad_accum_steps))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule)
    )

    result = TrainResult(steps=0)
    start = time.perf_counter()
    model.train()
    bar = tqdm(
        range(total), desc=desc, disable=not accelerator.is_local_main_process, leave=False, mininterval=1.0
    )
    for step in bar:
        micro = [
            {s: dict(next(it)) for s, it in zip(method.streams, streams, strict=True)}
            for _ in range(cfg.grad_accum_steps)
        ]
        for s in method.streams:
            counts = [_answer_tokens(mb[s]) for mb in micro]
            mean = max(1.0, sum(counts) / len(counts))
            for mb, c in zip(micro, counts, strict=True):
                mb[s]["token_weight"] = c / mean
        last: dict[str, Any] = {}

        def closure(micro: list[dict[str, Any]] = micro, last: dict[str, Any] = last) -> torch.Tensor:
            grad = torch.is_grad_enabled()
            total_loss = torch.zeros((), device=accelerator.device)
            stats: dict[str, float] = {}
            for i, mb in enumerate(micro):
                # Skip the gradient all-reduce on every micro-batch but the last (DDP).
                sync = (
                    contextlib.nullcontext()
                    if (not grad or i == len(micro) - 1)
                    else accelerator.no_sync(model)
                )
                with sync:
                    loss, st = method.loss(model, mb)
                    loss = loss / len(micro)
                    if grad:
                        accelerator.backward(loss)
                total_loss += loss.detach()
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v / len(micro)
            if grad and cfg.max_grad_norm is not None:
                last["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            last["stats"], last["loss"] = stats, float(total_loss)
            return total_loss

        opt.zero_grad(set_to_none=True)
        # accelerate's optimizer wrapper drops the closure's return value: read it from ``last``.
        opt.step(closure)
        loss = last["loss"]
        sched.step()
        result.steps = step + 1

        if not math.isfinite(loss):
            raise UnlearnflowError(f"{desc}: loss became {loss} at step {step + 1}; lower the learning rate")
        row = {"loss": loss, **last.get("stats", {}), **method.after_step(last.get("stats", {}))}
        if "grad_norm" in last:
            row["grad_norm"] = last["grad_norm"]
        row.update(
            lr=sched.get_last_lr()[0], epoch=(step + 1) / steps_per_epoch, time=time.perf_counter() - start
        )
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            result.rows.append({"step": step + 1, **row})
            if on_log is not None:
                on_log(row, step + 1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if divergence_limit is not None and abs(loss) > divergence_limit:
            result.stopped_early = f"|loss|={abs(loss):.4g} exceeded divergence_limit={divergence_limit}"
            log.warning("%s: stopping early at step %d: %s", desc, step + 1, result.stopped_early)
            break
    bar.close()
    result.wall_time = time.perf_counter() - start
    result.method_state = method.state_dict()
    accelerator.free_memory()
    return result
