"""Build, load and save models and tokenizers.

The embedded default is a small Llama-architecture model and a byte-level BPE tokenizer trained
from scratch (no hub access). Real models load from a hub id or a local directory. Weights are
read and written as safetensors only; ``trust_remote_code`` stays off unless the caller sets it.

torch and transformers are imported inside the functions that use them: a stage that imports this
module for its ``--help`` or its argument checks pays neither (bench/startup.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import ordinary_permissions

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``; deterministic for the same texts.

    The tokenizer adds BOS itself (a ``<s> $A`` post-processor, as Llama's does), so a tool that
    loads the saved ``tokenizer.json`` and encodes with default special tokens gets the ids the
    pipeline builds: ``data.tokenize`` encodes with ``add_special_tokens=False`` and puts BOS
    in front itself, for this tokenizer and any other alike (never a double BOS).

    Returns:
        A ``transformers`` fast tokenizer with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_scratch(tokenizer: Any, model_cfg: Any, seed: int) -> torch.nn.Module:
    """``build_llama`` shaped by ``model.scratch`` of ``model_cfg`` (a ``ModelConfig``), positions
    up to ``model.max_length``: the embedded benchmark's from-scratch model."""
    s = model_cfg.scratch
    return build_llama(
        tokenizer,
        hidden_size=s.hidden_size,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=model_cfg.max_length,
        tie_word_embeddings=s.tie_word_embeddings,
        seed=seed,
    )


def build_llama(
    tokenizer: Any,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    seed: int,
) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` sized for ``tokenizer``; same seed → same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Initialisation draws from the global RNG inside transformers: fork it so seeding here does
    # not disturb the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _check_local(source: str | Path) -> None:
    """A path-like source that does not exist is a user error, not a hub id to try."""
    text = str(source)
    if (text.startswith(("/", ".", "~")) or Path(text).exists() or text.count("/") > 1) and not Path(
        text
    ).expanduser().exists():
        raise UnlearnflowError(f"model directory not found: {text}")


def check_checkpoint_dir(path: str | Path) -> None:
    """A local Hugging Face checkpoint directory with a config and safetensors weights, or a one-line error.

    Cheap on purpose: adopting a ready multi-GB checkpoint must not load it just to look at it.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UnlearnflowError(f"checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise UnlearnflowError(f"{path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise UnlearnflowError(f"{path} has no *.safetensors weights (only safetensors are read)")


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer from a local directory or hub id; give it a pad token if it has none."""
    from transformers import AutoTokenizer

    _check_local(source)
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnlearnflowError(f"cannot load tokenizer from {source}: {exc}".splitlines()[0]) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a local directory or hub id, safetensors weights only, in ``dtype``
    (default float32).

    Raises:
        UnlearnflowError: one line for a missing directory, a bad config, or weights that are not
            readable safetensors (a truncated or corrupt ``model.safetensors``).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _check_local(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source),
            dtype=torch.float32 if dtype is None else dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except SafetensorError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnlearnflowError(
            f"cannot load model from {source}: its safetensors weights are truncated or corrupt ({detail})"
        ) from None
    except (OSError, ValueError) as exc:
        raise UnlearnflowError(f"cannot load model from {source}: {exc}".splitlines()[0]) from exc
    return model.to(device)


def save_pretrained(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Write a Hugging Face directory (config, safetensors weights, tokenizer) into ``out_dir``.

    Every file gets ordinary permissions (``io.ordinary_permissions``): safetensors writes its
    weights 0600.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _declare_portable_tokenizer_class(out_dir / "tokenizer_config.json")
    ordinary_permissions(out_dir)


def _declare_portable_tokenizer_class(path: Path) -> None:
    """Name the generic fast tokenizer ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``.

    transformers 5 writes its generic class as ``TokenizersBackend``, which transformers 4.x and
    other tools do not know; ``PreTrainedTokenizerFast`` (5.x's alias of the same class) loads the
    same ``tokenizer.json`` in both. A model-specific class is left as written.
    """
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UnlearnflowError(f"compute.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
