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
