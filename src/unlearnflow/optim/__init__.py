"""Optimizers, looked up by the names used in params.yaml (ALGORITHMS.md §3).

Every optimizer is a ``torch.optim.Optimizer``; how the training loop drives one step of it (one
closure call with backward, several, or gradient-free evaluations at perturbed weights) is the
contract in ``seam.py``. Grades: first order (adamw, sgd), compressed first order (signsgd,
signadam, nbit: ``first_order.py``), second order (sophia), zeroth order (zo_sgd, zo_adam,
zo_radazo: ``zeroth_order.py``), hybrid and smoothed first order (fo_zo, fo_rs: ``hybrid.py``).
``OptimizerSpec.zeroth_order`` marks optimizers with gradient-free steps, so that a method that
needs gradients (OFMU's Hessian-vector products) is refused with them before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from unlearnflow.config import Section, parse_section
from unlearnflow.errors import ConfigError
from unlearnflow.optim.seam import BuildContext
from unlearnflow.registry import Registry


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: its argument schema and its factory.

    ``factory(param_groups, *, lr, weight_decay, args, ctx)`` builds it (``ctx``: ``BuildContext``).
    ``zeroth_order``: some or all of its steps evaluate the objective without gradients.
    ``requires_grad``: some of its steps use first-order gradients.
    """

    Args: type[Section]
    factory: Callable[..., torch.optim.Optimizer]
    requires_grad: bool = True
    zeroth_order: bool = False


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer")


class OptimizerArgs(Section):
    """Keys every optimizer accepts besides its own hyperparameters.

    Optimizer grades need learning rates orders of magnitude apart (zeroth-order vs Adam), so each
    may set its own; it takes precedence over the method's (``unlearn.method_args.<m>.lr``), which
    takes precedence over ``unlearn.lr`` (``matrix.item_config``).
    """

    lr: float | None = Field(
        None, gt=0, description="this optimizer's learning rate; null: the method's or unlearn.lr"
    )
    epochs: float | None = Field(
        None, gt=0, description="this optimizer's epochs; null: the method's or unlearn.epochs"
    )


class AdamWArgs(OptimizerArgs):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class SGDArgs(OptimizerArgs):
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False


def _adamw(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: AdamWArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=args.betas, eps=args.eps)


def _sgd(
    params: Iterable[Any], *, lr: float, weight_decay: float, args: SGDArgs, ctx: BuildContext
) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=lr, weight_decay=weight_decay, momentum=args.momentum, nesterov=args.nesterov
    )


OPTIMIZERS.register("adamw")(OptimizerSpec(AdamWArgs, _adamw))
OPTIMIZERS.register("sgd")(OptimizerSpec(SGDArgs, _sgd))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not biases or norm gains (nanoGPT's split by tensor rank); frozen params excluded."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def parse_optimizer_args(
    name: str, args: Mapping[str, Any] | None, *, key: str = "unlearn.optimizer_args"
) -> tuple[OptimizerSpec, Section]:
    """Look ``name`` up and validate its arguments; stages call this before any heavy work."""
    spec = OPTIMIZERS.get(name)
    return spec, parse_section(dict(args or {}), f"{key}.{name}", spec.Args)


def build_optimizer(
    name: str,
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    args: Mapping[str, Any] | None = None,
    key: str = "unlearn.optimizer_args",
    ctx: BuildContext | None = None,
) -> tuple[torch.optim.Optimizer, OptimizerSpec]:
    """Build optimizer ``name`` over ``model``'s trainable parameters, its args validated."""
    spec, parsed = parse_optimizer_args(name, args, key=key)
    ctx = ctx if ctx is not None else BuildContext(model=model)
    return spec.factory(
        param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay, args=parsed, ctx=ctx
    ), spec


def check_pairing(method: str, optimizer: str, *, needs_grad: bool) -> None:
    """Refuse a method × optimizer pairing that cannot be defined, in one line naming both.

    A method that needs gradients of its own objective (OFMU: Hessian-vector products, a gradient
    similarity) cannot run where the optimizer evaluates it without gradients.
    """
    spec = OPTIMIZERS.get(optimizer)
    if needs_grad and spec.zeroth_order:
        raise ConfigError(
            f"method {method!r} cannot pair with optimizer {optimizer!r}: the method needs gradients "
            "(Hessian-vector products) and the optimizer evaluates it without them"
        )


# The grades beyond torch's own register themselves on import.
from unlearnflow.optim import first_order, hybrid, zeroth_order  # noqa: E402, F401
