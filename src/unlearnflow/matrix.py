"""The unlearning matrix: which method and optimizer names (and their arguments) params.yaml may list.

``unlearn.method_args`` and ``unlearn.optimizer_args`` are free-form mappings in ``UnlearnConfig``
because each method or optimizer validates its own section (its ``Args`` class lives beside its
code). This module closes the gap for the ``check_params`` stage: every listed name is registered,
every args section belongs to a registered name and validates, so a typo in a name or in an args
key (``method_args.grad_acent``, ``optimizer_args.sgd.momentun``) fails the next ``dvc repro`` in
one line even when no item that reads it would rerun.
"""

from __future__ import annotations

from unlearnflow.config import UnlearnConfig
from unlearnflow.errors import ConfigError

# Methods the registry holds for other stages (finetune's supervised loss), not unlearning methods.
NOT_UNLEARNING = frozenset({"sft"})


def check_unlearn_matrix(cfg: UnlearnConfig) -> None:
    """Validate the method / optimizer names and argument sections of the ``unlearn`` section.

    Raises:
        ConfigError: one line naming the key, the value and what is allowed.
    """
    from unlearnflow.methods import METHODS, build_method  # torch: only when the check runs
    from unlearnflow.optim import OPTIMIZERS, parse_optimizer_args

    methods = sorted(set(METHODS) - NOT_UNLEARNING)
    for key, names, known in (
        ("unlearn.methods", cfg.methods, methods),
        ("unlearn.method_args", list(cfg.method_args), methods),
        ("unlearn.optimizers", cfg.optimizers, sorted(OPTIMIZERS)),
        ("unlearn.optimizer_args", list(cfg.optimizer_args), sorted(OPTIMIZERS)),
    ):
        for name in names:
            if name not in known:
                raise ConfigError(f"unknown name {name!r} in {key}; known: {', '.join(known)}")
    for name, args in cfg.method_args.items():
        build_method(name, args)
    for name, args in cfg.optimizer_args.items():
        parse_optimizer_args(name, args)


def item_config(cfg: UnlearnConfig, method: str, optimizer: str) -> tuple[UnlearnConfig, dict[str, str]]:
    """The training config of one unlearn item: ``lr`` and ``epochs`` after per-item overrides.

    Precedence: ``unlearn.optimizer_args.<optimizer>.{lr,epochs}`` > ``unlearn.method_args.<method>.…``
    > ``unlearn.lr`` / ``unlearn.epochs``. The optimizer wins because an optimizer's grade moves the
    usable learning rate by orders of magnitude (zeroth-order vs Adam), a method's choice by less.

    Returns:
        The config and, for each of lr / epochs, the params key its value came from (logged).
    """
    from unlearnflow.methods import build_method
    from unlearnflow.optim import parse_optimizer_args

    m_args = build_method(method, cfg.method_args.get(method)).args
    _, o_args = parse_optimizer_args(optimizer, cfg.optimizer_args.get(optimizer))
    update: dict[str, float] = {}
    source: dict[str, str] = {}
    for key in ("lr", "epochs"):
        for where, args in (
            (f"unlearn.optimizer_args.{optimizer}.{key}", o_args),
            (f"unlearn.method_args.{method}.{key}", m_args),
        ):
            value = getattr(args, key, None)
            if value is not None:
                update[key], source[key] = value, where
                break
        else:
            source[key] = f"unlearn.{key}"
    return cfg.model_copy(update=update), source
