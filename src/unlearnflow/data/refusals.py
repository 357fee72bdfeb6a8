"""The "idk" stream: the forget questions answered with a refusal (idk_dpo, idk_nll).

TOFU (Maini et al. 2024, arXiv:2401.06121) unlearns by teaching the model to answer the forget
questions with "I don't know"-style refusals, one drawn per question from a list
(``idontknow.jsonl`` there). Ours, ``refusals.txt`` next to this module, is written for this project
in the same spirit: about a hundred varied one-sentence refusals.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from unlearnflow.errors import UnlearnflowError

REFUSALS_FILE = "refusals.txt"
# Split kinds whose rows are (question, answer) pairs, the only ones a refusal can answer; the idk
# rows are written as kind "qa" (``training_examples`` encodes qa/options/knowmem alike).
QUESTION_KINDS = ("qa", "options", "knowmem")


@cache
def refusals() -> tuple[str, ...]:
    """The shipped refusal answers, in file order (comment lines and blank lines skipped)."""
    text = resources.files("unlearnflow.data").joinpath(REFUSALS_FILE).read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def idk_rows(
    rows: Sequence[Mapping[str, Any]], kind: str, *, seed: int, method: str, split: str
) -> list[dict[str, str]]:
    """The forget rows with their answers replaced by refusals: row i keeps row i's question.

    Args:
        rows: the forget split's rows.
        kind: the forget split's kind (``layout.info[split].kind``).
        seed: the matrix item's seed; the refusal of each row is drawn from ``refusals()`` by a
            ``random.Random(seed)``, in row order, so an item's stream is reproducible and seeds
            differ in which refusal each question gets.
        method: the method that asked for the stream (for the error message).
        split: the forget split's name (for the error message).

    Returns:
        ``{"question", "answer"}`` rows of kind ``qa``, one per forget row, in the same order (so
        they pair row for row with the forget stream).

    Raises:
        UnlearnflowError: the forget split has no questions (a text corpus, completions, MCQ).
    """
    if kind not in QUESTION_KINDS:
        raise UnlearnflowError(
            f"method {method!r} answers forget questions with refusals, but forget split {split!r} is "
            f"{kind!r} (needs one of {', '.join(QUESTION_KINDS)}); use a method without an 'idk' stream"
        )
    pool = refusals()
    rng = random.Random(seed)
    return [{"question": row["question"], "answer": rng.choice(pool)} for row in rows]
