"""The unlearning matrix: which method × optimizer pairs (and their arguments) params.yaml may list.

``unlearn.method_args`` and ``unlearn.optimizer_args`` are free-form mappings in ``UnlearnConfig``
because each method or optimizer validates its own section (its ``Args`` class lives beside its
code). This module closes the gap for the ``check_params`` stage: every listed name is registered,
every args section belongs to a registered name and validates, so a typo in a name or in an args
key (``method_args.grad_acent``, ``optimizer_args.sgd.momentun``) fails the next ``dvc repro`` in
one line even when no item that reads it would rerun, and a pairing that cannot be defined (a
method that needs gradients with a gradient-free optimizer) fails there too, before any model loads.

``python -m unlearnflow.matrix --methods a,b --optimizers x,y [--exclude a:y]`` prints the
``unlearn.pairs`` block of a product with exclusions (pairs that cannot be defined are left out and
named on stderr), to paste into params.yaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from unlearnflow.config import UnlearnConfig
from unlearnflow.errors import ConfigError

# Methods the registry holds for other stages (the supervised loss of finetune and of the relearn
# attack), not unlearning methods: never offered or accepted where an unlearning method is asked for.
NOT_UNLEARNING = frozenset({"sft"})


def unlearning_methods() -> list[str]:
    """The registered method names an ``unlearn.pairs`` entry may use, sorted."""
    from unlearnflow.methods import METHODS  # torch: only when asked

    return sorted(set(METHODS) - NOT_UNLEARNING)


def check_unlearning_method(name: str, key: str | None = None) -> None:
    """Refuse ``name`` unless it is a registered unlearning method (one line listing those).

    Args:
        name: the method name given.
        key: where it was given (``unlearn.pairs[].method``); None for a command-line argument.

    Raises:
        ConfigError: ``unknown name 'x' in <key>; known: …`` (``unknown unlearning method 'x'; …``
            without a key); ``sft`` is named as a fine-tuning loss.
    """
    known = unlearning_methods()
    if name not in known:
        why = " (a fine-tuning loss, not an unlearning method)" if name in NOT_UNLEARNING else ""
        what = f"name {name!r} in {key}" if key else f"unlearning method {name!r}"
        raise ConfigError(f"unknown {what}{why}; known: {', '.join(known)}")


def check_unlearn_matrix(cfg: UnlearnConfig) -> None:
    """Validate the method / optimizer names and argument sections of the ``unlearn`` section.

    Raises:
        ConfigError: one line naming the key, the value and what is allowed.
    """
    from unlearnflow.methods import build_method  # torch: only when the check runs
    from unlearnflow.optim import OPTIMIZERS, parse_optimizer_args

    for key, names in (("unlearn.pairs[].method", cfg.methods), ("unlearn.method_args", cfg.method_args)):
        for name in names:
            check_unlearning_method(name, key)
    for key, names, known in (
        ("unlearn.pairs[].optimizer", cfg.optimizers, sorted(OPTIMIZERS)),
        ("unlearn.optimizer_args", list(cfg.optimizer_args), sorted(OPTIMIZERS)),
    ):
        for name in names:
            if name not in known:
                raise ConfigError(f"unknown name {name!r} in {key}; known: {', '.join(known)}")
    for name, args in cfg.method_args.items():
        build_method(name, args)
    for name, args in cfg.optimizer_args.items():
        parse_optimizer_args(name, args)
    for pair in cfg.pairs:
        check_pair(cfg, pair.method, pair.optimizer)


def check_pair(cfg: UnlearnConfig, method: str, optimizer: str) -> None:
    """Refuse ``method`` × ``optimizer`` if it cannot be defined (one line naming both)."""
    from unlearnflow.methods import build_method
    from unlearnflow.optim import check_pairing

    needs_grad = bool(getattr(build_method(method, cfg.method_args.get(method)), "needs_grad", False))
    check_pairing(method, optimizer, needs_grad=needs_grad)


def product_pairs(
    methods: Sequence[str], optimizers: Sequence[str], exclude: Sequence[tuple[str, str]] = ()
) -> tuple[list[dict[str, str]], list[str]]:
    """``methods`` × ``optimizers`` minus ``exclude`` and minus the pairings that cannot be defined.

    Returns:
        The pairs (``unlearn.pairs`` entries) and one line per pairing left out as undefinable.
    """
    from unlearnflow.optim import OPTIMIZERS

    for m in methods:  # an unknown name is an error, not a pairing left out
        check_unlearning_method(m, "--methods")
    for o in optimizers:
        OPTIMIZERS.get(o)
    cfg = UnlearnConfig()
    pairs, refused = [], []
    for m in methods:
        for o in optimizers:
            if (m, o) in exclude:
                continue
            try:
                check_pair(cfg, m, o)
            except ConfigError as err:
                refused.append(str(err))
                continue
            pairs.append({"method": m, "optimizer": o})
    return pairs, refused


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unlearnflow.matrix", description="print the unlearn.pairs of a product"
    )
    ap.add_argument("--methods", required=True, help="comma-separated method names")
    ap.add_argument("--optimizers", required=True, help="comma-separated optimizer names")
    ap.add_argument("--exclude", default="", help="comma-separated method:optimizer pairs to leave out")
    args = ap.parse_args(argv)
    try:
        exclude = [tuple(x.split(":", 1)) for x in args.exclude.split(",") if x]
        if any(len(x) != 2 for x in exclude):
            raise ConfigError(f"--exclude {args.exclude!r}: expected method:optimizer,…")
        pairs, refused = product_pairs(
            args.methods.split(","),
            args.optimizers.split(","),
            exclude,  # type: ignore[arg-type]
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in refused:
        print(f"left out: {line}", file=sys.stderr)
    print("  pairs:")
    for p in pairs:  # params.yaml's layout: list items at their key's indent (dvc exp run -S keeps it)
        print(f"  - method: {p['method']}\n    optimizer: {p['optimizer']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


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

    check_unlearning_method(method)  # the unlearn stage's first check: sft is refused here
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
