"""Attacks on an unlearned model (ALGORITHMS.md §4), looked up by the names in ``attack.names``.

An ``attack.names`` item names a section whose ``kind`` is a registry key here. An attack changes
a loaded model in place and returns statistics to log; the ``attack`` stage evaluates the model
right after. ``modifies_weights`` False (the ``none`` attack) skips the apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from unlearnflow.config import AttackConfig, Section
from unlearnflow.registry import Registry


class Attack(Protocol):
    """One attack kind (``none``, ``noise``, ``quantize``, ``relearn``), built from its section."""

    Args: ClassVar[type[Section]]
    modifies_weights: ClassVar[bool]

    def apply(self, model: torch.nn.Module, ctx: AttackContext) -> dict[str, float]:
        """Attack ``model`` in place; return statistics to log."""


@dataclass
class AttackContext:
    """What an attack may need beyond the model: the run's inputs and a place for its outputs.

    Attributes:
        tokenizer: the model's tokenizer.
        splits: the ``prepare`` output directory (relearning reads its rows).
        params: the params file (relearning reads ``model`` and ``unlearn.optimizer_args``).
        device: where to compute.
        extras: written by the attack, saved in the attacked model's ``info.json`` and read by
            its evaluation (relearning's excluded pool, recovery curve and trained rows).
    """

    tokenizer: Any = None
    splits: Path | None = None
    params: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extras: dict[str, Any] = field(default_factory=dict)


ATTACKS: Registry[type[Attack]] = Registry("attack")


def build_attack(name: str, cfg: AttackConfig) -> Attack:
    """Instantiate attack ``name`` (an ``attack.names`` item) from its section's ``kind``."""
    args = cfg.args(name)
    return ATTACKS.get(args.kind)(args)


from unlearnflow.attacks import noise as _noise  # noqa: E402, F401  (registers none, noise)
from unlearnflow.attacks import quantize as _quantize  # noqa: E402, F401  (registers quantize)
from unlearnflow.attacks import relearn as _relearn  # noqa: E402, F401  (registers relearn)
