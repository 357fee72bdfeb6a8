"""What a prepared benchmark is: named splits, each with a kind (row format) and a role.

Every benchmark loader (synthetic, TOFU, MUSE, WMDP, custom) returns a ``Benchmark``; ``prepare``
writes it with ``data.splits.write_splits`` and every later stage reads it back with
``data.splits.read_benchmark``. Stages never branch on the benchmark's name: finetune reads
``train``, unlearn reads ``unlearn``, evaluate reads each split's kind and role.

Kinds (the columns a row must have):

* ``qa``: ``question``, ``answer``; optional ``paraphrased_answer`` (str), ``paraphrased_question``,
  ``perturbed_answer`` (list of str, the same length on every row). TOFU forget/retain/holdout.
* ``options``: ``question``, ``answer``, ``perturbed_answer`` (list, >= 1). TOFU real authors /
  world facts: the answer competes with its perturbed versions.
* ``knowmem``: ``question``, ``answer``; optional ``few_shot`` (a list of ``{question, answer}``
  examples, rendered in the model's prompt format before the question) and ``context`` (a literal
  prefix put before the prompt). MUSE knowledge memorisation.
* ``completion``: ``prompt``, ``gt``. MUSE verbatim memorisation (continue a passage).
* ``text``: ``text``. Raw corpora (MUSE raw / privleak, WMDP corpora, a custom plain-text set).
* ``mcq``: ``question``, ``choices`` (list of >= 2 str), ``answer`` (int index). WMDP, MMLU.

Roles:

* ``forget``: evaluated; its numbers should fall (toward the oracle's) after unlearning.
* ``utility``: evaluated; its numbers enter ``model_utility`` and should stay.
* ``mia``: scored only as member / non-member set of the membership-inference attacks.
* ``train``: only trained on, never evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from unlearnflow.errors import UnlearnflowError

KINDS = ("qa", "options", "knowmem", "completion", "text", "mcq")
ROLES = ("forget", "utility", "mia", "train")
MODEL_ROLES = ("target", "oracle")
STREAMS = ("forget", "retain")
# Generation cap of qa / options answers (ROUGE) unless a benchmark sets its own: the reference's
# max_new_tokens (open-unlearning configs/generation/default.yaml, used by its TOFU eval).
REFERENCE_MAX_NEW_TOKENS = 200
PERTURBED_COLUMNS = frozenset({"paraphrased_answer", "perturbed_answer"})  # a qa split's truth-ratio inputs

# kind -> the metrics a utility split of that kind puts into model_utility (metrics/split_metrics.py
# registers the same kinds; tests/test_suite.py checks the two agree). qa: truth_ratio only
# when the split is ``perturbed``.
UTILITY_METRICS: dict[str, tuple[str, ...]] = {
    "qa": ("prob", "rouge", "truth_ratio"),
    "options": ("prob", "rouge", "truth_ratio"),
    "knowmem": ("knowmem",),
    "completion": ("verbmem",),
    "text": ("prob",),
    "mcq": ("mcq_accuracy",),
}

# kind -> (required columns, list-valued columns among them or optional)
_REQUIRED: dict[str, tuple[str, ...]] = {
    "qa": ("question", "answer"),
    "options": ("question", "answer", "perturbed_answer"),
    "knowmem": ("question", "answer"),
    "completion": ("prompt", "gt"),
    "text": ("text",),
    "mcq": ("question", "choices", "answer"),
}
# kind -> optional columns: on every row of a split or on none (``check_rows``).
_OPTIONAL: dict[str, tuple[str, ...]] = {
    "qa": ("paraphrased_answer", "paraphrased_question", "perturbed_answer"),
    "options": ("paraphrased_answer", "paraphrased_question"),
}


@dataclass(frozen=True)
class SplitInfo:
    """How one split is read (``kind``) and what it is for (``role``).

    ``perturbed`` (``qa`` only): every row carries ``paraphrased_answer`` and ``perturbed_answer``,
    so the truth ratio applies. ``Benchmark.layout`` derives it from the rows; it fixes which
    metrics enter ``model_utility`` (``Layout.utility_components``).
    """

    kind: str
    role: str
    perturbed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnlearnflowError(f"split kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.role not in ROLES:
            raise UnlearnflowError(f"split role {self.role!r} is not one of {', '.join(ROLES)}")


@dataclass
class Benchmark:
    """A prepared benchmark.

    Attributes:
        splits: split name -> rows (JSON-serialisable dicts).
        info: split name -> ``SplitInfo``; the same keys as ``splits``.
        train: ``target`` / ``oracle`` -> the splits that model fine-tunes on.
        unlearn: ``forget`` / ``retain`` -> the split each unlearning stream reads.
        mia: ``(members, non_members)`` splits of the membership-inference attacks, or None.
        forget_quality: the split whose per-sample truth ratios enter the KS test against the
            oracle (TOFU's forget split), or None when the benchmark has no such split.
        max_new_tokens: the default generation cap of qa / options answers (``rouge``), used
            when ``evaluate.max_new_tokens`` is null; the reference's 200 unless the benchmark's
            answers provably fit in fewer (the embedded one).
    """

    splits: dict[str, list[dict[str, Any]]]
    info: dict[str, SplitInfo]
    train: dict[str, list[str]]
    unlearn: dict[str, str]
    mia: tuple[str, str] | None = None
    forget_quality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the structure and every row's columns; one-line ``UnlearnflowError`` on a problem."""
        if set(self.splits) != set(self.info):
            raise UnlearnflowError(
                f"benchmark splits {sorted(self.splits)} and split infos {sorted(self.info)} differ"
            )
        for name, rows in self.splits.items():
            if not rows:
                raise UnlearnflowError(f"split {name!r} is empty")
            check_rows(name, rows, self.info[name].kind)
        for role in MODEL_ROLES:
            self._known(self.train.get(role) or [], f"train.{role}")
            if not self.train.get(role):
                raise UnlearnflowError(f"benchmark has no training splits for the {role} model")
        for stream in STREAMS:
            if stream not in self.unlearn:
                raise UnlearnflowError(f"benchmark names no split for the unlearning stream {stream!r}")
            self._known([self.unlearn[stream]], f"unlearn.{stream}")
        if self.mia is not None:
            self._known(list(self.mia), "mia")
        if self.forget_quality is not None:
            self._known([self.forget_quality], "forget_quality")

    def _known(self, names: Sequence[str], what: str) -> None:
        unknown = [n for n in names if n not in self.splits]
        if unknown:
            raise UnlearnflowError(f"benchmark {what} names unknown splits {unknown}")

    @property
    def layout(self) -> Layout:
        """Everything but the rows: what the manifest stores and later stages read (with each
        ``qa`` split's ``perturbed`` flag read off its rows)."""
        info = {
            n: replace(i, perturbed=all(r.keys() >= PERTURBED_COLUMNS for r in self.splits[n]))
            if i.kind == "qa"
            else i
            for n, i in self.info.items()
        }
        return Layout(info, self.train, self.unlearn, self.mia, self.forget_quality, self.max_new_tokens)

    def to_manifest(self) -> dict[str, Any]:
        """The JSON structure stored under ``"benchmark"`` in the splits manifest."""
        return self.layout.to_manifest()


@dataclass(frozen=True)
class Layout:
    """The manifest part of a ``Benchmark`` (everything but the rows), as later stages read it."""

    info: dict[str, SplitInfo]
    train: dict[str, list[str]]
    unlearn: dict[str, str]
    mia: tuple[str, str] | None
    forget_quality: str | None
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any]) -> Layout:
        try:
            return cls(
                info={n: SplitInfo(**v) for n, v in data["splits"].items()},
                train={r: list(v) for r, v in data["train"].items()},
                unlearn=dict(data["unlearn"]),
                mia=tuple(data["mia"]) if data.get("mia") else None,  # type: ignore[arg-type]
                forget_quality=data.get("forget_quality"),
                max_new_tokens=int(data.get("max_new_tokens", REFERENCE_MAX_NEW_TOKENS)),
            )
        except (KeyError, TypeError) as exc:
            raise UnlearnflowError(f"malformed benchmark layout in the splits manifest: {exc}") from None

    def to_manifest(self) -> dict[str, Any]:
        return {
            "splits": {n: _info_manifest(i) for n, i in self.info.items()},
            "train": {r: list(v) for r, v in self.train.items()},
            "unlearn": dict(self.unlearn),
            "mia": list(self.mia) if self.mia else None,
            "forget_quality": self.forget_quality,
            "max_new_tokens": self.max_new_tokens,
        }

    def evaluated(self) -> list[str]:
        """Splits the evaluate stage scores (every role except ``train``), in ``info`` order."""
        return [n for n, i in self.info.items() if i.role != "train"]

    def utility_components(self) -> list[str]:
        """The ``<split>_<metric>`` aggregates whose harmonic mean is ``model_utility``.

        Fixed by the benchmark, not by ``evaluate.metrics``: every ``utility`` split contributes
        the metrics of its kind (``UTILITY_METRICS``; a ``qa`` split its truth ratio only when its
        rows carry paraphrased and perturbed answers). TOFU gives open-unlearning's nine
        (``configs/eval/tofu_metrics/model_utility.yaml``: retain, real_authors, world_facts ×
        prob, rouge, truth_ratio); MUSE its knowmem on retain; WMDP its MMLU accuracies.
        """
        return [
            f"{name}_{metric}"
            for name, info in self.info.items()
            if info.role == "utility"
            for metric in UTILITY_METRICS[info.kind]
            if metric != "truth_ratio" or info.kind != "qa" or info.perturbed
        ]


def _info_manifest(info: SplitInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": info.kind, "role": info.role}
    if info.kind == "qa":
        out["perturbed"] = info.perturbed
    return out


def check_rows(name: str, rows: Sequence[Mapping[str, Any]], kind: str) -> None:
    """Every row of split ``name`` has the columns of ``kind`` with usable values (one-line error).

    An optional column of a qa / options split (``_OPTIONAL``) is on every row or on none, and
    ``perturbed_answer`` has the same length on every row: the scorers decide from the split which
    metrics apply (truth ratio needs both answers), so a row without them would fail mid-evaluation.
    """
    required = _REQUIRED[kind]
    width: int | None = None
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UnlearnflowError(f"split {name!r} row {i}: expected an object, got {type(row).__name__}")
    optional = [c for c in _OPTIONAL.get(kind, ()) if any(c in row for row in rows)]
    for i, row in enumerate(rows):
        where = f"split {name!r} row {i}"
        lacking = [c for c in optional if c not in row]
        if lacking:
            has = next(j for j, r in enumerate(rows) if lacking[0] in r)
            raise UnlearnflowError(
                f"{where}: no {lacking[0]}, but row {has} has one; a {kind} split has each of "
                f"{', '.join(_OPTIONAL[kind])} on every row or on none"
            )
        for col in ("paraphrased_answer", "paraphrased_question"):
            if col in optional and (not isinstance(row[col], str) or not row[col].strip()):
                raise UnlearnflowError(
                    f"{where}: column {col!r} must be a non-empty string, got {row[col]!r}"
                )
        missing = [c for c in required if c not in row]
        if missing:
            raise UnlearnflowError(
                f"{where}: missing column(s) {', '.join(missing)} (a {kind} split needs "
                f"{', '.join(required)}; has {', '.join(sorted(row)) or 'none'})"
            )
        for col in required:
            if col in ("perturbed_answer", "choices", "answer") and kind in ("options", "mcq"):
                continue
            if not isinstance(row[col], str) or not row[col].strip():
                raise UnlearnflowError(
                    f"{where}: column {col!r} must be a non-empty string, got {row[col]!r}"
                )
        if "perturbed_answer" in row and kind in ("qa", "options"):
            pert = row["perturbed_answer"]
            if not isinstance(pert, list) or not pert or not all(isinstance(p, str) for p in pert):
                raise UnlearnflowError(f"{where}: perturbed_answer must be a non-empty list of strings")
            if width is None:
                width = len(pert)
            elif len(pert) != width:
                raise UnlearnflowError(
                    f"{where}: {len(pert)} perturbed answers, but earlier rows have {width}"
                )
        if kind == "options" and not isinstance(row["answer"], str):
            raise UnlearnflowError(f"{where}: column 'answer' must be a string")
        if kind == "mcq":
            choices, answer = row["choices"], row["answer"]
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not all(isinstance(c, str) for c in choices)
            ):
                raise UnlearnflowError(f"{where}: choices must be a list of at least 2 strings")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise UnlearnflowError(
                    f"{where}: answer must be the index of the correct choice (0..{len(choices) - 1}), "
                    f"got {answer!r}"
                )
