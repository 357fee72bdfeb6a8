"""Unlearning (and fine-tuning) methods, looked up by the names used in params.yaml.

A method owns *what* is minimised on a batch; the optimizer owns *how* parameters move; the one
training loop in ``unlearnflow.train`` drives both. The shared shape is the ``Method`` protocol in
``base``: no base class with behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unlearnflow.config import parse_section
from unlearnflow.methods import bilevel as _bilevel  # noqa: F401  (ofmu)
from unlearnflow.methods import finetune as _finetune  # noqa: F401  (registers "sft")
from unlearnflow.methods import primal_dual as _primal_dual  # noqa: F401  (pdu)
from unlearnflow.methods import rmu as _rmu  # noqa: F401  (rmu)
from unlearnflow.methods import scalarized as _scalarized  # noqa: F401  (grad_ascent, grad_diff, npo, …)
from unlearnflow.methods.base import METHODS, Batch, Method

__all__ = ["METHODS", "Batch", "Method", "build_method"]


def build_method(
    name: str, args: Mapping[str, Any] | None = None, *, key: str = "unlearn.method_args"
) -> Method:
    """Instantiate method ``name`` with its hyperparameters validated against the method's ``Args``.

    Args:
        name: registry key (``grad_ascent``, ``grad_diff``, …).
        args: the method's mapping from params.yaml (``unlearn.method_args.<name>``); None → defaults.
        key: the params path of ``args``, for error messages.
    """
    cls = METHODS.get(name)
    return cls(parse_section(dict(args or {}), f"{key}.{name}", cls.Args))
