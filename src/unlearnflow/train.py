"""The one training loop: finetune, unlearn and (later) the relearn attack all run through ``run``.

It reads top to bottom: data loaders per stream → accelerator → optimizer and schedule → for each
optimizer step, fetch the step's micro-batches, build a closure over them, and let the optimizer
take its step. The closure is the seam between the two axes of the matrix (``optim/seam.py``): the
method defines what the closure computes, the optimizer decides how often and at which weights to
call it (once with backward for first-order optimizers, several times for randomized smoothing,
under ``no_grad`` at perturbed weights for zeroth-order ones). Gradients are clipped once per step,
on the gradient the optimizer uses, and first-order updates go through accelerate's optimizer
wrapper without the closure (so fp16 loss scaling and sharded wrappers see a plain ``step()``).
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
from unlearnflow.methods.base import TrainContext
from unlearnflow.optim import build_optimizer, check_pairing
from unlearnflow.optim.seam import BuildContext, build_gradient, is_zeroth_order_step

log = logging.getLogger(__name__)

# Health checks (``health_flags``): a run that blows up or stops moving still "finishes", so the
# loop says so instead of passing a broken model on silently. The thresholds, and why:
# * stalled: a global gradient norm ≤ 1e-12 is no small learning rate but a flat surface (a softmax
#   saturated after a blow-up, underflow, a dead model); such steps cannot move first-order weights.
#   One or two can be legitimate (a micro-batch whose answers were all cut by max_length), so the
#   flag needs ≥ max(5, 10%) of the steps (every step of a run shorter than 5).
STALL_GRAD_NORM = 1e-12
STALL_MIN_STEPS, STALL_MIN_FRACTION = 5, 0.1
# * diverged: a minimised per-token NLL/KL that ends above 2·max(its start, ln V), ln V being the
#   NLL of a uniform prediction over the vocabulary. A healthy fine-tune goes down from about ln V;
#   GradDiff's retain term may rise while forgetting, but ending twice worse than both the start and
#   guessing uniformly means confidently wrong predictions: a blow-up, not a trade-off. The total
#   ``loss`` is not read: gradient ascent's forget term legitimately makes it unbounded below.
DIVERGE_FACTOR = 2.0
# * collapsed: the per-token forget NLL (``forget_nll``, logged by every unlearning method) ending
#   above 2·ln V: the forget answers get far less than uniform probability (below 1/V² per token), i.e. the model avoids them rather
#   than having forgotten them (a model that never saw them, the oracle, sits below ln V). Metrics
#   read there (truth ratio, forget quality) are in the degenerate regime of ALGORITHMS.md §5.
COLLAPSE_FACTOR = 2.0
# "Ended" = the mean over the last max(1, 10%) steps, so one noisy last batch does not decide.
END_WINDOW_FRACTION = 0.1
# Minimised per-token statistics a method may log: sft's "nll", grad_diff's "retain_loss" (NLL or KL).
DESCENT_STATS = ("nll", "retain_loss")


@dataclass
class TrainResult:
    """What a training run produced besides the updated model.

    ``health`` holds one line per problem found by :func:`health_flags` (empty when healthy).
    """

    steps: int
    rows: list[dict[str, float]] = field(default_factory=list)
    stopped_early: str | None = None
    wall_time: float = 0.0
    method_state: dict[str, Any] = field(default_factory=dict)
    health: list[str] = field(default_factory=list)


def _end_mean(values: Sequence[float]) -> float:
    window = max(1, math.ceil(END_WINDOW_FRACTION * len(values)))
    return sum(values[-window:]) / window


def health_flags(trace: Sequence[Mapping[str, float]], *, vocab_size: int | None) -> list[str]:
    """Flags of an unhealthy run from its per-step statistics (thresholds: see the module constants).

    Args:
        trace: one mapping per optimizer step, with any of ``grad_norm`` (global norm before
            clipping), the minimised per-token losses in ``DESCENT_STATS`` and ``forget_nll`` (the
            per-token NLL of the forget batch, which every unlearning method logs).
        vocab_size: V of the model's output layer; ln V is the uniform-prediction NLL. ``None``:
            the bounds use the start values alone.

    Returns:
        One-line strings starting with ``stalled:``, ``diverged:`` or ``collapsed:``; empty when
        none applies.
    """
    flags: list[str] = []
    if not trace:
        return flags
    ln_v = math.log(vocab_size) if vocab_size else 0.0
    norms = [row["grad_norm"] for row in trace if "grad_norm" in row]
    if norms:
        stalled = [i for i, g in enumerate(norms) if g <= STALL_GRAD_NORM]
        need = min(len(norms), max(STALL_MIN_STEPS, math.ceil(STALL_MIN_FRACTION * len(norms))))
        if len(stalled) >= need:
            flags.append(
                f"stalled: gradient norm <= {STALL_GRAD_NORM:g} on {len(stalled)} of {len(norms)} steps "
                f"(first at step {stalled[0] + 1}); the weights stopped moving"
            )
    for key in DESCENT_STATS:
        values = [row[key] for row in trace if key in row]
        if not values:
            continue
        end, bound = _end_mean(values), DIVERGE_FACTOR * max(values[0], ln_v)
        if not end <= bound:  # also catches NaN
            flags.append(
                f"diverged: {key} ended at {end:.4g} nats/token > {DIVERGE_FACTOR:g}·max(start {values[0]:.4g}, "
                f"ln V {ln_v:.4g}) = {bound:.4g}"
            )
    forget = [row["forget_nll"] for row in trace if "forget_nll" in row]
    if forget and ln_v > 0:
        end, bound = _end_mean(forget), COLLAPSE_FACTOR * ln_v
        if not end <= bound:
            flags.append(
                f"collapsed: forget NLL ended at {end:.4g} nats/token > {COLLAPSE_FACTOR:g}·ln V = {bound:.4g} "
                "(below-uniform likelihood on the forget set)"
            )
    return flags


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


def _answered_rows(sub: Mapping[str, torch.Tensor]) -> int:
    return int((sub["labels"][:, 1:] != IGNORE_INDEX).any(dim=1).sum())


def _all_reduce_mean(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean"))


def _all_reduce_tensor(accelerator: Any, t: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.to(accelerator.device), reduction="mean")


def _one_pass(
    examples: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[dict[str, Any]]:
    for start in range(0, len(examples), batch_size):
        sub = collate(list(examples[start : start + batch_size]), pad_id)
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sub.items()} | {
            "token_weight": 1.0,
            "seq_weight": 1.0,
        }


class _StepClosure:
    """The method's objective on one step's micro-batches (the ``StepClosure`` of ``optim/seam.py``).

    Each call is one evaluation at the current weights; its loss and statistics are recorded so that
    the step logs their mean over however many calls the optimizer made.
    """

    def __init__(
        self,
        *,
        step: int,
        seed: int,
        micro: list[dict[str, Any]],
        model: torch.nn.Module,
        method: Method,
        accelerator: Any,
    ) -> None:
        self.step, self._seed, self._micro = step, seed, micro
        self._model, self._method, self._acc = model, method, accelerator
        self.losses: list[float] = []
        self.stats: list[dict[str, float]] = []
        self.extra: dict[str, float] = {}

    def _zero_grad(self) -> None:
        for p in self._model.parameters():
            p.grad = None

    def __call__(self) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        if grad:  # each call's gradient is its own: a second call does not add to the first
            self._zero_grad()
        micro, method, acc = self._micro, self._method, self._acc
        total = torch.zeros((), device=acc.device)
        stats: dict[str, float] = {}
        if getattr(method, "owns_backward", False):  # the method leaves its direction in .grad (OFMU)
            total, stats = method.compute_gradients(self._model, micro)  # type: ignore[attr-defined]
            total = total.detach()
        else:
            for i, mb in enumerate(micro):
                # Skip the gradient all-reduce on every micro-batch but the last (DDP).
                sync = (
                    contextlib.nullcontext()
                    if (not grad or i == len(micro) - 1)
                    else acc.no_sync(self._model)
                )
                with sync:
                    loss, st = method.loss(self._model, mb)
                    loss = loss / len(micro)
                    if grad:
                        acc.backward(loss)
                total += loss.detach()
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v / len(micro)
        self.losses.append(float(total))
        self.stats.append(stats)
        return total

    def sampled_backward(self) -> int:
        """Gauss-Newton-Bartlett probe (Sophia, Liu et al. 2023, Alg. 2): ``.grad`` ← ∇ of the mean
        token cross-entropy of the step's inputs against labels drawn from the model's own softmax
        at the scored positions (every stream's answer tokens). Plain ``backward`` (no loss
        scaling): the estimate is squared, and DDP averages it across processes like any gradient."""
        self._zero_grad()
        gen = torch.Generator(device=self._acc.device).manual_seed(self._seed * 1_000_003 + self.step)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.enable_grad():
            for mb in self._micro:
                for sub in mb.values():
                    logits = self._model(
                        input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]
                    ).logits
                    scored = sub["labels"][:, 1:] != IGNORE_INDEX
                    picked = logits[:, :-1][scored]
                    with torch.no_grad():
                        drawn = torch.multinomial(torch.softmax(picked.float(), -1), 1, generator=gen)[:, 0]
                    parts.append((picked, drawn))
            tokens = sum(len(d) for _, d in parts)
            if tokens == 0:
                return 0
            loss = (
                sum(torch.nn.functional.cross_entropy(x.float(), y, reduction="sum") for x, y in parts)
                / tokens
            )
            loss.backward()
        if self._acc.num_processes > 1:
            # DDP averages the per-process means: the estimator's B is every process's tokens together.
            total = torch.tensor([float(tokens)], dtype=torch.float64, device=self._acc.device)
            tokens = round(float(self._acc.reduce(total, reduction="sum")))
        return tokens

    def report(self, **stats: float) -> None:
        self.extra.update(stats)

    def mean_stats(self) -> dict[str, float]:
        keys = dict.fromkeys(k for st in self.stats for k in st)
        return {k: sum(st.get(k, 0.0) for st in self.stats) / len(self.stats) for k in keys}


def _vocab_size(model: torch.nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else None


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
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
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
        max_steps: run exactly this many optimizer steps (data cycling), instead of ``cfg.epochs``.
        on_step: called with the step count after every optimizer step (the relearning attack
            evaluates the model at chosen counts), before any early stop.

    Returns:
        A ``TrainResult`` with the per-step rows and the run's health flags (also logged as a
        warning): see :func:`health_flags`; non-finite weights at the end are flagged ``diverged``.

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
    # The first stream sets the epoch; the others are sampled alongside it with their own seeds, but
    # a paired stream takes its partner's seed, so the two draw rows in the same order.
    paired: Mapping[str, str] = getattr(method, "paired_streams", {})
    index = {s: i for i, s in enumerate(method.streams)}
    for s, partner in paired.items():
        if len(data[s]) != len(data[partner]):
            raise UnlearnflowError(
                f"stream {s!r} must pair row for row with {partner!r}: {len(data[s])} vs {len(data[partner])} rows"
            )
    seeds = {s: cfg.seed + index[paired.get(s, s)] for s in method.streams}
    loaders = [_loader(data[s], cfg.batch_size, seeds[s], pad_token_id) for s in method.streams]
    # What accelerate's prepared loader will yield per process (it shards batches across processes).
    per_process = math.ceil(len(loaders[0]) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(per_process / cfg.grad_accum_steps))
    total = max_steps if max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    ctx = TrainContext(
        device=accelerator.device,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        grad_accum_steps=cfg.grad_accum_steps,
        all_reduce_mean=lambda x: _all_reduce_mean(accelerator, x),
        batches=lambda stream: _one_pass(data[stream], cfg.batch_size, pad_token_id, accelerator.device),
    )
    check_pairing(type(method).__name__, optimizer, needs_grad=method.needs_grad)
    # Before the optimizer is built: a method may freeze parameters (RMU trains chosen layers only).
    method.setup(model, ctx)
    opt, spec = build_optimizer(
        optimizer,
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        args=optimizer_args,
        key=optimizer_key,
        ctx=BuildContext(
            model=model,
            seed=cfg.seed,
            all_reduce_mean=lambda t: _all_reduce_tensor(accelerator, t),
            total_steps=total,
        ),
    )
    if method.needs_grad and not spec.requires_grad:
        raise ConfigError(
            f"method {type(method).__name__} needs gradients; optimizer {optimizer!r} is gradient-free"
        )

    model, opt, *loaders = accelerator.prepare(model, opt, *loaders)
    # The closure goes to the optimizer itself, never through accelerate's wrapper (see seam.py).
    raw_opt = getattr(opt, "optimizer", opt)
    streams = [_cycle(dl) for dl in loaders]
    # On the raw optimizer: a zeroth-order step calls its step() directly, which the scheduler counts.
    sched = torch.optim.lr_scheduler.LambdaLR(
        raw_opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=total, schedule=cfg.schedule)
    )

    result = TrainResult(steps=0)
    trace: list[dict[str, float]] = []
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
            # Token means and sequence means of the whole step from per-micro-batch means.
            for key, counts in (
                ("token_weight", [_answer_tokens(mb[s]) for mb in micro]),
                ("seq_weight", [_answered_rows(mb[s]) for mb in micro]),
            ):
                mean = max(1.0, sum(counts) / len(counts))
                for mb, c in zip(micro, counts, strict=True):
                    mb[s][key] = c / mean
        closure = _StepClosure(
            step=step, seed=cfg.seed, micro=micro, model=model, method=method, accelerator=accelerator
        )
        grad_norm: float | None = None
        if is_zeroth_order_step(raw_opt, step):
            with torch.no_grad():  # evaluations at perturbed weights; the optimizer updates in place
                raw_opt.step(closure)
        else:
            build_gradient(raw_opt, closure)
            # Once per step, on the gradient the update uses. Without clipping, a max norm of inf
            # still returns the norm (the health checks need it) and scales by exactly 1.
            max_norm = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            opt.step()
        opt.zero_grad(set_to_none=True)
        if not closure.losses:
            raise UnlearnflowError(f"{desc}: optimizer {optimizer!r} took a step without evaluating the loss")
        # The mean over the step's evaluations: for a ZO step, the loss at θ (±μu average).
        loss = sum(closure.losses) / len(closure.losses)
        stats = closure.mean_stats()
        sched.step()
        result.steps = step + 1

        if not math.isfinite(loss):
            raise UnlearnflowError(f"{desc}: loss became {loss} at step {step + 1}; lower the learning rate")
        row = {"loss": loss, **stats, **method.after_step(stats), **closure.extra}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        trace.append({k: row[k] for k in ("grad_norm", *DESCENT_STATS) if k in row})
        if "forget_nll" in row:  # every unlearning method logs its forget batch's per-token NLL
            trace[-1]["forget_nll"] = row["forget_nll"]
        row.update(
            lr=sched.get_last_lr()[0], epoch=(step + 1) / steps_per_epoch, time=time.perf_counter() - start
        )
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            result.rows.append({"step": step + 1, **row})
            if on_log is not None:
                on_log(row, step + 1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step + 1)
        if divergence_limit is not None and abs(loss) > divergence_limit:
            result.stopped_early = f"|loss|={abs(loss):.4g} exceeded divergence_limit={divergence_limit}"
            log.warning("%s: stopping early at step %d: %s", desc, step + 1, result.stopped_early)
            break
    bar.close()
    result.wall_time = time.perf_counter() - start
    result.method_state = method.state_dict()
    result.health = health_flags(trace, vocab_size=_vocab_size(accelerator.unwrap_model(model)))
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # a non-finite gradient on the last step leaves a finite loss and broken weights
        result.health.append(
            f"diverged: {len(bad)} parameter tensors hold NaN/inf at the end (e.g. {bad[0]})"
        )
    for flag in result.health:
        log.warning("%s: unhealthy run: %s", desc, flag)
    accelerator.free_memory()
    return result
