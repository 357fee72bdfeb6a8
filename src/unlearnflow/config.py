"""Typed sections of params.yaml.

Each stage loads the sections it reads into frozen pydantic models. Defaults live here and
nowhere else. An unknown key or a bad value becomes a one-line ``ConfigError`` that names the
key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from unlearnflow.errors import ConfigError


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(Section):
    """Size of the embedded fictitious-author world (see ``data.synthetic``)."""

    n_authors: int = Field(40, ge=4, description="authors the models train on (forget + retain)")
    n_holdout_authors: int = Field(4, ge=1, description="authors never trained on (MIA non-members)")
    qa_per_attribute: int = Field(
        3,
        ge=1,
        le=3,
        description="question templates per attribute (of 4; one is held out for the paraphrase)",
    )
    n_real_authors: int = Field(24, ge=2, description="famous authors of the world (utility split)")
    n_world_facts: int = Field(24, ge=2, description="facts about the world's places (utility split)")


class BenchmarkConfig(Section):
    name: Literal["synthetic"] = "synthetic"
    split: str = Field("forget10", pattern=r"^forget\d\d$", description="forgetNN: the last NN% of authors")
    seed: int = 0
    synthetic: SyntheticConfig = SyntheticConfig()

    @property
    def forget_percent(self) -> int:
        return int(self.split.removeprefix("forget"))

    @field_validator("split")
    @classmethod
    def _percent_in_range(cls, v: str) -> str:
        if not 0 < int(v.removeprefix("forget")) < 100:
            raise ValueError("forget percentage must be between 1 and 99")
        return v


class ScratchModelConfig(Section):
    """A small Llama built from config and trained from scratch (the offline default)."""

    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> ScratchModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.scratch.hidden_size={self.hidden_size} is not divisible by "
                f"model.scratch.num_heads={self.num_heads}"
            )
        return self


class ModelConfig(Section):
    """``base: scratch`` builds the default model; anything else is a hub id or a local directory."""

    base: str = "scratch"
    target: str | None = Field(None, description="ready target checkpoint: finetune@target copies it")
    oracle: str | None = Field(None, description="ready oracle checkpoint: finetune@oracle copies it")
    trust_remote_code: bool = False
    max_length: int = Field(96, ge=8, description="token cap of prompt + answer")
    scratch: ScratchModelConfig = ScratchModelConfig()


# Constrained types, so that a subclass overriding a default keeps the constraint.
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]
Schedule = Literal["constant", "linear", "cosine"]


class TrainConfig(Section):
    """Fields shared by every stage that trains through ``train.run``."""

    epochs: Positive = 1.0
    batch_size: Count = 16
    grad_accum_steps: Count = 1
    lr: Positive = 1e-4
    weight_decay: NonNegative = 0.0
    schedule: Schedule = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_grad_norm: Positive | None = Field(1.0, description="clip the global grad norm; null: no clipping")
    log_every: Count = 1
    seed: int = 0


class FinetuneConfig(TrainConfig):
    epochs: Positive = 40
    batch_size: Count = 32
    lr: Positive = 3e-3
    weight_decay: NonNegative = 0.01
    schedule: Schedule = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 20


class UnlearnConfig(TrainConfig):
    methods: list[str] = ["grad_ascent", "grad_diff"]
    optimizers: list[str] = ["adamw"]
    epochs: Positive = 5
    lr: Positive = 3e-4
    divergence_limit: float | None = Field(
        None, gt=0, description="stop early when |loss| exceeds this (gradient ascent is unbounded)"
    )
    method_args: dict[str, dict[str, Any]] = {}
    optimizer_args: dict[str, dict[str, Any]] = {}


class NoiseAttackConfig(Section):
    sigma: float = Field(0.05, ge=0, description="noise std relative to each weight tensor's RMS")
    seed: int = 0


class NoArgs(Section):
    """An attack (or method) without parameters; its params.yaml entry is ``{}``."""


class AttackConfig(Section):
    """``names`` spans the attack axis of the matrix; one sub-section of arguments per attack."""

    names: list[str] = ["none", "noise"]
    none: NoArgs = NoArgs()
    noise: NoiseAttackConfig = NoiseAttackConfig()


class EvaluateConfig(Section):
    metrics: list[str] = ["prob", "rouge", "truth_ratio"]
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    max_samples: int | None = Field(
        None, ge=1, description="cap per split (a seeded subset); null: every sample"
    )
    seed: int = 0


class TrackingConfig(Section):
    experiment: str | None = Field(None, description="MLflow experiment; null: unlearnflow-<benchmark.name>")
    artifact_max_mb: float = Field(50.0, ge=0, description="log checkpoints up to this size as artifacts")


class ComputeConfig(Section):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")


S = TypeVar("S", bound=Section)


def read_params(path: Path) -> dict[str, Any]:
    """The raw params.yaml mapping; a missing or malformed file is a ``ConfigError``."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_section(path: Path, section: str, cls: type[S]) -> S:
    """Validate the ``section`` of params file ``path`` into ``cls``.

    Raises:
        ConfigError: one line naming the dotted key, the value and what is allowed.
    """
    raw = read_params(path).get(section) or {}
    return parse_section(raw, section, cls)


def parse_section(raw: Any, section: str, cls: type[S]) -> S:
    """Validate a mapping into ``cls``; errors are prefixed with ``section``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {raw!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, section, cls)) from None


def _one_line(exc: ValidationError, section: str, cls: type[Section]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join([section, *loc])
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_fields_at(cls, loc[:-1])))
        return f"unknown key {key}; allowed keys here: {allowed}"
    if err["type"] == "missing":
        return f"missing key {key}"
    value = err.get("input")
    return f"bad value for {key}: {value!r}: {err['msg']}"


def _fields_at(cls: type[Section], path: list[str]) -> list[str]:
    """Field names of the nested section at ``path`` (for the 'allowed keys' list)."""
    for part in path:
        field = cls.model_fields.get(part)
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, Section)):
            return []
        cls = sub
    return list(cls.model_fields)


def declared_keys(cls: type[Section], prefix: str) -> set[str]:
    """Dotted keys of every leaf field of ``cls`` (used to check dvc.yaml's ``params:`` lists)."""
    keys: set[str] = set()
    for name, field in cls.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            keys |= declared_keys(sub, f"{prefix}.{name}")
        else:
            keys.add(f"{prefix}.{name}")
    return keys
