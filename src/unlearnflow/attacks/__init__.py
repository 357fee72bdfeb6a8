"""Attacks on an unlearned model (ALGORITHMS.md §4), looked up by the names in ``attack.names``.

An attack changes a loaded model in place and returns statistics to log. ``modifies_weights``
False (the ``none`` attack) lets the stage hand the input checkpoint on by hard link instead of
writing a copy of possibly many GB.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from unlearnflow.config import AttackConfig, Section
from unlearnflow.registry import Registry


class Attack(Protocol):
    Args: ClassVar[type[Section]]
    modifies_weights: ClassVar[bool]

    def apply(self, model: torch.nn.Module) -> dict[str, float]:
        """Attack ``model`` in place; return statistics to log."""


ATTACKS: Registry[type[Attack]] = Registry("attack")


def build_attack(name: str, cfg: AttackConfig) -> Attack:
    """Instantiate attack ``name`` with its section of ``attack`` (``attack.<name>``) or its defaults."""
    cls = ATTACKS.get(name)
    args: Any = getattr(cfg, name, None) or cls.Args()
    return cls(args)


from unlearnflow.attacks import noise as _noise  # noqa: E402, F401  (registers none, noise)
