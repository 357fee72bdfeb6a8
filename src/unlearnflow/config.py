"""Typed sections of params.yaml.

Each stage loads the sections it reads into frozen pydantic models. Defaults live here and
nowhere else. An unknown key or a bad value becomes a one-line ``ConfigError`` that names the
key, the value and what is allowed.
"""

from __future__ import annotations

import itertools
import os
import typing
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


class TofuConfig(Section):
    """TOFU from ``benchmark.source`` (see ``data.tofu``); ``benchmark.split`` picks forgetNN."""

    retain_eval: str = Field(
        "retain_perturbed", description="config holding the retain rows that are evaluated"
    )


class MuseConfig(Section):
    """MUSE News / Books from ``benchmark.source`` (see ``data.muse``)."""

    knowmem_few_shot: bool = Field(
        True, description="prefix knowmem questions with the *_qa_icl examples when the source has them"
    )


class WmdpConfig(Section):
    """WMDP-style MCQ sets and corpora. A name is a file / config under ``benchmark.source``, or
    ``<hub id>:<config>`` for one that lives elsewhere (e.g. ``cais/mmlu:college_biology``)."""

    forget_mcq: list[str] = Field(["wmdp-bio", "wmdp-cyber"], min_length=1)
    utility_mcq: list[str] = ["cais/mmlu:college_biology", "cais/mmlu:computer_security"]
    forget_corpus: list[str] = Field(["cais/wmdp-corpora:cyber-forget-corpus"], min_length=1)
    retain_corpus: list[str] = Field(["Salesforce/wikitext:wikitext-2-raw-v1"], min_length=1)
    mcq_split: str = Field("test", description="dataset split of the MCQ sets on the hub")
    corpus_split: str = Field("train", description="dataset split of the corpora on the hub")
    max_corpus_docs: int | None = Field(None, ge=1, description="keep the first N documents per corpus")


class CustomConfig(Section):
    """A user's own forget set: JSONL files of ``question``/``answer`` (or ``prompt``/``response``)
    pairs or of ``text`` (see ``data.custom``)."""

    forget: str | None = Field(None, description="JSONL file of what the model must forget")
    retain: str | None = Field(None, description="JSONL file of what it must keep knowing")
    holdout: str | None = Field(
        None, description="optional JSONL file of similar data never trained on (MIA non-members)"
    )
    verbmem_prefix_words: int = Field(
        32, ge=1, description="plain-text forget set: words of a passage given as the verbmem prompt"
    )
    verbmem_continuation_words: int = Field(
        64, ge=1, description="plain-text forget set: words of the true continuation it is scored on"
    )


BenchmarkName = Literal["synthetic", "tofu", "muse", "wmdp", "custom"]


class BenchmarkConfig(Section):
    name: BenchmarkName = "synthetic"
    source: str | None = Field(
        None, description="hub id or local directory of tofu / muse / wmdp (unused by synthetic, custom)"
    )
    split: str = Field(
        "forget10", pattern=r"^forget\d\d$", description="forgetNN: the last NN% of authors (synthetic, tofu)"
    )
    seed: int = 0
    synthetic: SyntheticConfig = SyntheticConfig()
    tofu: TofuConfig = TofuConfig()
    muse: MuseConfig = MuseConfig()
    wmdp: WmdpConfig = WmdpConfig()
    custom: CustomConfig = CustomConfig()

    @property
    def forget_percent(self) -> int:
        return int(self.split.removeprefix("forget"))

    @field_validator("split")
    @classmethod
    def _percent_in_range(cls, v: str) -> str:
        if not 0 < int(v.removeprefix("forget")) < 100:
            raise ValueError("forget percentage must be between 1 and 99")
        return v

    @model_validator(mode="after")
    def _source_given(self) -> BenchmarkConfig:
        if self.name in ("tofu", "muse", "wmdp") and not self.source:
            raise ValueError(f"benchmark.source is required for benchmark.name={self.name!r}")
        if self.name == "custom" and not (self.custom.forget and self.custom.retain):
            raise ValueError("benchmark.custom.forget and benchmark.custom.retain are required for custom")
        return self


# The folder of user data that `prepare` depends on in dvc.yaml: an edit to a file under it (kept in
# git, or `dvc add`-ed there) reruns prepare and what follows. A file read from anywhere else is no
# DVC dep, so an edit to it would rerun nothing.
INPUTS_DIR = "inputs"


def looks_local(source: str, root: Path) -> bool:
    """Whether ``source`` names a local path, not a hub id: it exists under ``root`` or looks like a
    path (``/``, ``.``, ``~``); the loaders use it too (``data.sources.is_local``)."""
    return source.startswith(("/", ".", "~")) or (root / Path(source).expanduser()).exists()


def local_inputs(cfg: BenchmarkConfig, root: Path) -> list[tuple[str, str, str]]:
    """``(params key, value, local path)`` of each file or directory ``prepare`` reads for ``cfg``.

    The custom files always; for tofu / muse / wmdp a local ``source``, and for wmdp every set or
    corpus named ``<local directory>:<config>`` (the path is the directory). A hub id is left out.
    """
    if cfg.name == "custom":
        files = {"forget": cfg.custom.forget, "retain": cfg.custom.retain, "holdout": cfg.custom.holdout}
        return [(f"benchmark.custom.{key}", value, value) for key, value in files.items() if value]
    found = []
    if cfg.name in ("tofu", "muse", "wmdp") and cfg.source and looks_local(cfg.source, root):
        found.append(("benchmark.source", cfg.source, cfg.source))
    if cfg.name == "wmdp":
        w = cfg.wmdp
        for field, refs in (
            ("forget_mcq", w.forget_mcq),
            ("utility_mcq", w.utility_mcq),
            ("forget_corpus", w.forget_corpus),
            ("retain_corpus", w.retain_corpus),
        ):
            for i, ref in enumerate(refs):
                source = ref.rpartition(":")[0]  # "<source>:<config>"; a bare config is under source
                if source and looks_local(source, root):
                    found.append((f"benchmark.wmdp.{field}[{i}]", ref, source))
    return found


def check_inputs_versioned(cfg: BenchmarkConfig, root: Path) -> None:
    """Refuse a local input of ``prepare`` outside ``<root>/inputs/``, where DVC would not see edits.

    The check is lexical (``..`` collapsed, symlinks not followed): DVC hashes a symlinked file under
    inputs/ by its content, so such a link is fine. Run by ``check_params`` (every ``dvc repro``);
    a stage run by hand accepts any path.

    Raises:
        ConfigError: one line naming the key, the value and what is allowed.
    """
    inputs = os.path.abspath(root / INPUTS_DIR)
    for key, value, local in local_inputs(cfg, root):
        path = os.path.abspath(root / Path(local).expanduser())
        if os.path.commonpath([inputs, path]) != inputs:
            raise ConfigError(
                f"{key}={value!r} is outside {INPUTS_DIR}/, so DVC would not see edits to it: "
                f"move it under {INPUTS_DIR}/ (docs/benchmarks.md)"
            )


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
    chat_template: bool = Field(
        False,
        description="render questions with the tokenizer's chat template (instruction-tuned checkpoints)",
    )
    system_prompt: str | None = Field(None, description="chat template: a system turn before each question")
    chat_date_string: str | None = Field(
        None, description="chat template: the date_string some templates take"
    )
    scratch: ScratchModelConfig = ScratchModelConfig()

    @model_validator(mode="after")
    def _chat_needs_a_real_tokenizer(self) -> ModelConfig:
        if self.chat_template and self.base == "scratch":
            raise ValueError("model.chat_template needs a pretrained tokenizer; model.base is scratch")
        return self

    def prompt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``data.tokenize.PromptFormat``."""
        return {
            "chat": self.chat_template,
            "system_prompt": self.system_prompt,
            "date_string": self.chat_date_string,
        }


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


class Pair(Section):
    """One method × optimizer item of the unlearn matrix (each runs once per seed)."""

    method: str
    optimizer: str


class UnlearnConfig(TrainConfig):
    """``pairs`` × ``seeds`` span the unlearn matrix of dvc.yaml.

    ``pairs`` lists the method × optimizer items to run, so a study never holds a pairing that cannot
    run (OFMU's Hessian-vector products under a gradient-free optimizer); ``python -m
    unlearnflow.matrix`` prints the pairs of a product with exclusions.

    ``seed`` (from ``TrainConfig``) is not a params key here: each seed of ``seeds`` is its own matrix
    item and reaches the stage on its command line (``with_seed``), so that adding a seed runs one
    new item instead of rerunning every item that would otherwise depend on the whole list.
    """

    pairs: list[Pair] = Field(
        [Pair(method="grad_diff", optimizer="adamw")],
        min_length=1,
        description="the method × optimizer items, each {method: <name>, optimizer: <name>}",
    )
    seeds: list[int] = Field(
        [0, 1, 2], min_length=1, description="one unlearn item per seed (torch seed and data order)"
    )
    epochs: Positive = 5
    lr: Positive = 3e-4
    divergence_limit: float | None = Field(
        None, gt=0, description="stop early when |loss| exceeds this (gradient ascent is unbounded)"
    )
    method_args: dict[str, dict[str, Any]] = {}
    optimizer_args: dict[str, dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_single_seed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "seed" in raw:
            raise ValueError("unlearn.seed is replaced by unlearn.seeds: a list, one matrix item per seed")
        if isinstance(raw, dict) and ({"methods", "optimizers"} & set(raw)):
            raise ValueError(
                "unlearn.methods / unlearn.optimizers are replaced by unlearn.pairs: a list of "
                "{method: <name>, optimizer: <name>} (python -m unlearnflow.matrix prints a product)"
            )
        return raw

    @field_validator("pairs")
    @classmethod
    def _distinct_pairs(cls, v: list[Pair]) -> list[Pair]:
        seen = [(p.method, p.optimizer) for p in v]
        dup = next((x for i, x in enumerate(seen) if x in seen[:i]), None)
        if dup is not None:
            raise ValueError(f"pair {{method: {dup[0]}, optimizer: {dup[1]}}} is listed twice")
        return v

    @property
    def methods(self) -> list[str]:
        """The distinct methods of ``pairs``, in order."""
        return list(dict.fromkeys(p.method for p in self.pairs))

    @property
    def optimizers(self) -> list[str]:
        """The distinct optimizers of ``pairs``, in order."""
        return list(dict.fromkeys(p.optimizer for p in self.pairs))

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct (each names a matrix item)")
        return v

    def with_seed(self, seed: int) -> UnlearnConfig:
        """This config for the matrix item of ``seed`` (the one ``train.run`` reads as ``cfg.seed``)."""
        return self.model_copy(update={"seed": seed})


class NoArgs(Section):
    """A method without parameters; its params.yaml entry is ``{}``."""


class NoAttackConfig(Section):
    """``none``: the model as it is, the baseline every attack is compared with."""

    kind: Literal["none"] = "none"


class NoiseAttackConfig(Section):
    """``noise``: Gaussian noise of relative scale σ on every weight matrix (ALGORITHMS.md §4)."""

    kind: Literal["noise"] = "noise"
    sigma: float = Field(0.05, ge=0, description="noise std relative to each weight tensor's RMS")
    seed: int = 0


class QuantizeAttackConfig(Section):
    """``quantize``: post-training weight quantization of every Linear but the LM head (ALGORITHMS.md §4).

    ``bnb`` is bitsandbytes, the quantization-attack paper's setting (Zhang et al., ICLR 2025,
    "Catastrophic Failure of LLM Unlearning via Quantization"): blockwise FP4 / NF4 at 4 bits (the
    library's default FP4 is the paper's), LLM.int8's row-wise absmax int8 at 8 bits. ``rtn`` is a
    transparent symmetric round-to-nearest baseline, per group of ``group_size`` input weights of
    each output row (null: one scale per output row).
    """

    kind: Literal["quantize"] = "quantize"
    backend: Literal["bnb", "rtn"] = "bnb"
    bits: Literal[4, 8] = 4
    quant_type: Literal["fp4", "nf4"] = Field("fp4", description="bnb 4-bit code book (fp4: the default)")
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="bnb 4-bit: weights per absmax block (bnb default 64)"
    )
    group_size: int | None = Field(
        128, ge=1, description="rtn: weights per scale along the input dimension; null = per output row"
    )


class LoraConfig(Section):
    """Low-rank adapters for the relearning attack (Hu et al. 2021, arXiv:2106.09685), merged after."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: ΔW = (alpha / r)·BA")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear module names to adapt, or all-linear (every Linear but the LM head)"
    )


class RelearnAttackConfig(Section):
    """``relearn``: fine-tune the attacked model on n examples, evaluated on forget rows it never saw.

    The forget split is cut (seeded) into an evaluation part (``eval_fraction`` of its rows) and a
    relearn pool; ``data: forget`` trains on ``n`` rows of the pool, ``retain`` / ``holdout`` on ``n``
    rows of that split ("benign" relearning on related data). Whatever the data, the forget
    metrics are reported on the evaluation part only, after each count in ``steps`` (the recovery
    curve; step 0 is the model before relearning). ALGORITHMS.md §4.
    """

    kind: Literal["relearn"] = "relearn"
    data: Literal["forget", "retain", "holdout"] = "forget"
    n: int = Field(16, ge=1, description="training examples")
    eval_fraction: float = Field(0.5, gt=0, lt=1, description="share of forget rows kept for evaluation")
    steps: list[int] = Field([5, 10, 25, 50], min_length=1, description="curve points; the last ends the run")
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    optimizer: str = Field("adamw", description="a first-order optimizer name")
    optimizer_args: dict[str, Any] = Field({}, description="that optimizer's hyperparameters (betas, …)")
    weight_decay: float = Field(0.0, ge=0)
    lora: LoraConfig | None = Field(None, description="null: full fine-tuning")
    curve_metrics: list[str] = Field(["prob", "rouge"], min_length=1, description="metrics of the curve")
    seed: int = 0

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v) or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("steps must be positive and strictly increasing")
        return v


ATTACK_KINDS: dict[str, type[Section]] = {
    "none": NoAttackConfig,
    "noise": NoiseAttackConfig,
    "quantize": QuantizeAttackConfig,
    "relearn": RelearnAttackConfig,
}
AttackArgs = NoAttackConfig | NoiseAttackConfig | QuantizeAttackConfig | RelearnAttackConfig


class AttackConfig(Section):
    """``names`` spans the attack axis of the matrix; ``controls`` are also applied to target and oracle.

    Every other key is one attack's section, named freely (``quantize_4bit``) with its ``kind``
    (none, noise, quantize, relearn); ``kind`` defaults to the key, so ``noise: {sigma: 0.1}`` is a
    noise attack. A name without a section is the kind of that name with its defaults.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    names: list[str] = Field(["none"], min_length=1, description="attacks of the unlearned models")
    controls: list[str] = Field([], description="attacks also applied to the target and the oracle")

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        for key, value in raw.items():
            if key not in ("names", "controls"):
                _attack_section(key, value)
        for key in ("names", "controls"):
            for name in raw.get(key) or []:
                if isinstance(name, str) and name not in raw and name not in ATTACK_KINDS:
                    raise ValueError(
                        f"attack.{key}: {name!r} has no section attack.{name} and is no attack kind "
                        f"({', '.join(ATTACK_KINDS)})"
                    )
        return raw

    @field_validator("names", "controls")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("attack names must be distinct (each names a matrix item)")
        return v

    def args(self, name: str) -> AttackArgs:
        """The typed section of attack ``name`` (its defaults when it has none)."""
        return _attack_section(name, (self.model_extra or {}).get(name, {}))  # type: ignore[return-value]


def _attack_section(name: str, raw: Any) -> Section:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"attack.{name}: expected a mapping, got {raw!r}")
    kind = raw.get("kind", name)
    if kind not in ATTACK_KINDS:
        raise ConfigError(
            f"attack.{name}: kind {kind!r} is unknown; allowed kinds: {', '.join(ATTACK_KINDS)}"
        )
    return parse_section({**raw, "kind": kind}, f"attack.{name}", ATTACK_KINDS[kind])


DEFAULT_METRICS = [
    "prob",
    "rouge",
    "truth_ratio",
    "exact_memorization",
    "extraction_strength",
    "knowmem",
    "verbmem",
    "mcq_accuracy",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_pp",
    "mia_grad_norm",
    "mia_reference",
    "privleak",
]


class EvaluateConfig(Section):
    """The metric suite (``metrics.suite``); each metric runs on the splits it applies to."""

    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1)
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="generation cap of TOFU-style answers (rouge); null: the benchmark's default "
        "(the reference's 200 for TOFU and custom QA, a bound every answer fits in for synthetic)",
    )
    knowmem_max_new_tokens: int = Field(32, ge=1, description="generation cap of MUSE knowmem answers")
    verbmem_max_new_tokens: int = Field(128, ge=1, description="generation cap of MUSE verbmem continuations")
    text_max_length: int = Field(
        2048,
        ge=1,
        description="token cap of a scored plain text after its prefix (text splits: MUSE privleak / MIA "
        "texts; completion: verbmem continuations), the reference's CompletionDataset max_length; "
        "not model.max_length",
    )
    min_k_fraction: float = Field(0.4, gt=0, le=1, description="k of Min-K% and Min-K%++ (and privleak)")
    grad_norm_p: float = Field(2.0, ge=1, description="p of the gradient p-norm of mia_grad_norm")
    mcq_format: Literal["letter", "text"] = Field(
        "letter", description="score the option letters after a lettered prompt, or each option's text"
    )
    max_samples: int | None = Field(
        None, ge=1, description="cap per split (a seeded subset); null: every sample"
    )
    seed: int = 0
    definitions: Literal["reference", "unlearnflow"] = Field(
        "reference",
        description="metric definitions: open-unlearning's (guards, ES = 1/|y| on a wrong last token, "
        "zlib of the decoded scored tokens) or unlearnflow's (docs/metrics.md)",
    )
    leak_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="per-fact leak check: a forget answer without a marked secret still leaks when at "
        "least this fraction of its fact words (answer words not in the question nor in the wrong "
        "answers, shared with the paraphrase, stopwords dropped) is in the greedy generation "
        "(docs/metrics.md)",
    )
    secret_field: str = Field(
        "secret",
        min_length=1,
        description="the forget-row column holding a user-marked secret span (a string or a list of "
        "strings); a row with one leaks when any span is generated, whatever its other words",
    )

    def suite_options(self, max_length: int) -> dict[str, Any]:
        """Keyword arguments of ``metrics.SuiteOptions``."""
        return {
            "batch_size": self.batch_size,
            "max_length": max_length,
            "max_new_tokens": self.max_new_tokens,
            "knowmem_max_new_tokens": self.knowmem_max_new_tokens,
            "verbmem_max_new_tokens": self.verbmem_max_new_tokens,
            "text_max_length": self.text_max_length,
            "min_k_fraction": self.min_k_fraction,
            "grad_norm_p": self.grad_norm_p,
            "mcq_format": self.mcq_format,
            "max_samples": self.max_samples,
            "seed": self.seed,
            "definitions": self.definitions,
        }


class TrackingConfig(Section):
    experiment: str | None = Field(None, description="MLflow experiment; null: unlearnflow-<benchmark.name>")
    artifact_max_mb: float = Field(50.0, ge=0, description="log checkpoints up to this size as artifacts")


class ComputeConfig(Section):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")


class Params(Section):
    """The whole params.yaml: one field per section, so a new field of any section class is checked
    with no list of keys kept anywhere else. ``validate_params`` checks a file against it."""

    benchmark: BenchmarkConfig = BenchmarkConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    attack: AttackConfig = AttackConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()


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
    """Validate the whole params file ``path`` (``validate_params``), then its ``section`` into ``cls``.

    The whole file, not only ``section``: a typo in a section this stage does not read (an
    ``unlearn.lr_typo`` seen by ``evaluate``) must not pass silently just because the stage that
    reads it did not rerun.

    Raises:
        ConfigError: one line naming the dotted key, the value and what is allowed.
    """
    raw = validate_params(path)
    return parse_section(raw.get(section) or {}, section, cls)


def validate_params(path: Path) -> dict[str, Any]:
    """Check every section of params file ``path`` against ``Params``; return the raw mapping.

    Unknown sections and unknown keys anywhere are errors, as are bad values. Sections written as
    an empty key (``tracking:``) count as empty mappings.

    Raises:
        ConfigError: one line naming the dotted key (see ``load_section``).
    """
    raw = read_params(path)
    parse_section({k: {} if v is None else v for k, v in raw.items()}, "", Params)
    return raw


def parse_section(raw: Any, section: str, cls: type[S]) -> S:
    """Validate a mapping into ``cls``; errors are prefixed with ``section`` (none if empty)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{section or 'params'}: expected a mapping, got {raw!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, section, cls)) from None


def _one_line(exc: ValidationError, section: str, cls: type[Section]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join([section, *loc] if section else loc)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_fields_at(cls, loc[:-1])))
        what = "section" if cls is Params and len(loc) == 1 else "key"
        return f"unknown {what} {key}; allowed {what}s here: {allowed}"
    if err["type"] == "missing":
        return f"missing key {key}"
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):
        # A whole-section check (model validator): its message already names the keys.
        return str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    return f"bad value for {key}: {value!r}: {err['msg']}"


def _fields_at(cls: type[Section], path: list[str]) -> list[str]:
    """Field names of the nested section at ``path`` (for the 'allowed keys' list)."""
    for part in path:
        if part.isdigit():  # an index into a list of sections (unlearn.pairs.0.method)
            continue
        field = cls.model_fields.get(part)
        sub = field.annotation if field else None
        if typing.get_origin(sub) is list:
            sub = typing.get_args(sub)[0]
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
