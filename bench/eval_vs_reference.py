"""Our evaluator against open-unlearning's TOFU evaluator, side by side on identical work.

Usage: python bench/eval_vs_reference.py --reference PATH [--model models/target] [--oracle models/oracle]
                                         [--splits data/splits] [--rounds 3] [--quick]
                                         [--out docs/eval-vs-reference.md]

PATH is a checkout of locuslab/open-unlearning (its code is imported from PATH/src, never copied).
Both evaluators get the same model, the same rows (our prepared TOFU-format splits, written as the
local JSON files the reference's ``QADataset`` loads), token-identical inputs (checked on every
row), the same 23 numbers of our default TOFU suite, the same generation cap, batch size and greedy
decoding. The metric loops (model loaded, configs built: from the first metric to the last) run
alternately, reference then ours, ``--rounds`` times after one untimed warm-up each; our loop's
phases (batched scoring, greedy generation, per-sample gradient norms) are timed by patching the
functions ``bench/eval_throughput.py`` patches. Every number both compute is compared. With
``--process-rounds`` (1 by default, 0 with ``--quick``) each evaluator also runs once as a whole
fresh process (imports, config, model load, loop). Writes ``--out`` (markdown) and its ``.json``.

One file on purpose (over the ~400 lines STYLE.md asks a reason for): the lead runs it as one
command, and the reference's setup, the token check, both loops, the child mode and the report
only make sense together.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from unlearnflow.data.benchmark import Layout
    from unlearnflow.metrics import SuiteOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",  # the reference's progress bars: off, which only helps its time
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_key, _value)

# The reference's TOFU metric configs (configs/eval/tofu_metrics), in the order of its
# configs/eval/tofu.yaml with the commented-out ones enabled; model_utility computes the nine
# retain / ra / wf components as its pre_compute. Together: the 23 numbers of our default suite.
REFERENCE_METRICS = [
    "forget_Truth_Ratio",
    "forget_quality",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "model_utility",
    "privleak",
    "extraction_strength",
    "exact_memorization",
    "mia_min_k_plus_plus",
    "mia_min_k",
    "mia_loss",
    "mia_zlib",
    "mia_gradnorm",
    "mia_reference",
]
# What the oracle's reference logs (retain_logs_path) must hold for forget_quality and privleak.
REFERENCE_ORACLE_METRICS = ["forget_Truth_Ratio", "mia_min_k"]
# our key -> the reference's key in its logs (TOFU_EVAL.json, pre_compute results included)
PAIRS = {
    "forget_prob": "forget_Q_A_Prob",
    "forget_rouge": "forget_Q_A_ROUGE",
    "forget_truth_ratio": "forget_truth_ratio",
    "forget_exact_memorization": "exact_memorization",
    "forget_extraction_strength": "extraction_strength",
    "retain_prob": "retain_Q_A_Prob",
    "retain_rouge": "retain_Q_A_ROUGE",
    "retain_truth_ratio": "retain_Truth_Ratio",
    "real_authors_prob": "ra_Q_A_Prob_normalised",
    "real_authors_rouge": "ra_Q_A_ROUGE",
    "real_authors_truth_ratio": "ra_Truth_Ratio",
    "world_facts_prob": "wf_Q_A_Prob_normalised",
    "world_facts_rouge": "wf_Q_A_ROUGE",
    "world_facts_truth_ratio": "wf_Truth_Ratio",
    "model_utility": "model_utility",
    "forget_quality": "forget_quality",
    "privleak": "privleak",
    "mia_loss": "mia_loss",
    "mia_zlib": "mia_zlib",
    "mia_min_k": "mia_min_k",
    "mia_min_k_pp": "mia_min_k_plus_plus",
    "mia_grad_norm": "mia_gradnorm",
    "mia_reference": "mia_reference",
}
# the reference's TOFU dataset names (hf_args.name) -> our split
REFERENCE_SPLITS = {
    "forget10": "forget",
    "forget10_perturbed": "forget",
    "holdout10": "holdout",
    "retain_perturbed": "retain",
    "real_authors_perturbed": "real_authors",
    "world_facts_perturbed": "world_facts",
}
ANSWER_COLUMNS = ("answer", "paraphrased_answer", "perturbed_answer")
TOLERANCE = 1e-5  # relative difference under which two numbers are the same number
# Where `evaluate.definitions: unlearnflow` departs from the reference on purpose (docs/metrics.md,
# "Definitions: reference or unlearnflow"); under `reference` (the default) nothing may differ.
_TR, _NORM = "truth ratio without the +1e-10 guards", "normalised option prob without +1e-10"
CONVENTIONS = {
    **dict.fromkeys(["forget_truth_ratio", "retain_truth_ratio", "forget_quality"], _TR),
    **dict.fromkeys(["real_authors_truth_ratio", "world_facts_truth_ratio"], _TR),
    **dict.fromkeys(["real_authors_prob", "world_facts_prob"], _NORM),
    "model_utility": f"{_TR}; {_NORM}",
    "forget_extraction_strength": "extraction strength k = n, not the reference loop's n − 1",
    "mia_zlib": "zlib size of the raw answer text, not of the decoded label tokens",
}
# Our phases: the function timed, patched in the module that calls it (as bench/eval_throughput.py).
# If the evaluator moves a call, change this table only.
PHASES = {
    "scoring": ("unlearnflow.metrics.scored_split", "score_examples"),
    "generation": ("unlearnflow.metrics.scored_split", "generate_greedy"),
    "grad_norm": ("unlearnflow.metrics.suite", "grad_norm_scores"),
}


# ---------------------------------------------------------------- the reference's inputs


def import_reference(ref: Path) -> None:
    """Make the reference's ``src`` importable without running ``evals/__init__.py``, which imports
    its lm-evaluation-harness evaluator (``lm_eval``, not installed and not needed for TOFU)."""
    src = str(ref / "src")
    if not (ref / "src" / "evals" / "tofu.py").is_file():
        sys.exit(f"{ref} is not an open-unlearning checkout (no src/evals/tofu.py)")
    sys.path.insert(0, src)
    package = types.ModuleType("evals")
    package.__path__ = [str(ref / "src" / "evals")]
    sys.modules.setdefault("evals", package)


def plain_template(template: str) -> tuple[dict[str, Any], str]:
    """The reference's non-chat ``template_args`` that give our prompt tokens, and the prefix its
    answers need.

    Ours tokenises ``[bos] "Question: {q}\\nAnswer:"`` and ``" " + answer`` apart; the reference
    tokenises ``user_start_tag + q + user_end_tag + asst_start_tag + answer`` at once (BOS from the
    tokenizer) and counts as prompt the tokens of the text before the answer. With the space after
    "Answer:" kept on the answer side (the Llama-2 tags put it in ``asst_start_tag``), the
    byte-level pre-tokenizer splits both texts at the same places; ``check_tokens`` asserts it.
    """
    start, end = template.split("{question}")
    tags = {"apply_chat_template": False, "user_start_tag": start, "user_end_tag": end}
    return {**tags, "asst_start_tag": "", "asst_end_tag": "\n\n"}, " "


def write_reference_data(data: dict[str, list[dict]], folder: Path, prefix: str) -> dict[str, Path]:
    """Each split as a JSON-lines file of the TOFU columns, answers prefixed by ``prefix``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in data.items():
        path = folder / f"{split}.jsonl"
        with path.open("w") as fh:
            for row in rows:
                out = {"question": row["question"]}
                for col in ANSWER_COLUMNS:
                    if col in row:
                        value = row[col]
                        out[col] = [prefix + v for v in value] if isinstance(value, list) else prefix + value
                fh.write(json.dumps(out) + "\n")
        files[split] = path
    return files


def _walk(node: Any, fn: Callable[[dict], None]) -> None:
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            _walk(value, fn)
    elif isinstance(node, list):
        for value in node:
            _walk(value, fn)


def reference_config(
    ref: Path, names: list[str], files: dict[str, Path], setup: dict[str, Any]
) -> DictConfig:
    """The reference's eval config for the metrics ``names`` (hydra-composed from its own
    configs/eval/tofu_metrics), reading ``files`` and capped as ours is.

    ``setup`` holds ``batch_size``, ``max_length``, ``max_new_tokens``, ``retain_logs_path`` (or
    None), ``reference_model_path`` and ``output_dir``.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ref / "configs"), version_base=None):
        composed = compose(overrides=[f"+eval/tofu_metrics=[{','.join(names)}]"])
    base = {
        "handler": "TOFUEvaluator",
        "output_dir": setup["output_dir"],
        "overwrite": False,  # its default: a metric already computed as a pre_compute is reused
        "forget_split": "forget10",
        "holdout_split": "holdout10",
        "retain_logs_path": setup["retain_logs_path"],
        "question_key": "question",
        "batch_size": setup["batch_size"],
    }
    cfg = OmegaConf.to_container(OmegaConf.merge({"eval": {"tofu": base}}, composed), resolve=True)
    tofu = cfg["eval"]["tofu"]
    if "mia_reference" in tofu["metrics"]:
        tofu["metrics"]["mia_reference"]["reference_model_path"] = setup["reference_model_path"]

    def localise(node: dict) -> None:
        if "hf_args" in node:  # a QADataset's args: our file instead of the hub's locuslab/TOFU
            split = REFERENCE_SPLITS[node["hf_args"]["name"]]
            node["hf_args"] = {"path": "json", "data_files": str(files[split]), "split": "train"}
            node["max_length"] = setup["max_length"]
        if "generation_args" in node:
            node["generation_args"]["max_new_tokens"] = setup["max_new_tokens"]

    _walk(tofu, localise)
    return OmegaConf.create(tofu)


def check_tokens(
    eval_cfg: DictConfig, tok: Any, template_args: dict, data: dict[str, list[dict]], opts: SuiteOptions
) -> int:
    """Assert that every sequence the reference builds equals ours; returns how many were compared.

    Each distinct dataset of ``eval_cfg`` (split, answer column, scoring or generation) is built
    with the reference's ``QADataset``; each item's ``input_ids`` and ``labels`` (scoring) or
    prompt ``input_ids`` (generation) must equal ``encode_qa`` / ``encode_prompt``'s.
    """
    from unlearnflow.data.tokenize import encode_prompt, encode_qa

    # The reference's top-level ``data`` package (PATH/src): by name, since whether a linter calls
    # ``data`` first- or third-party depends on the folders beside this repository's checkout.
    get_datasets = importlib.import_module("data").get_datasets

    seen: dict[tuple, dict] = {}

    def collect(node: dict) -> None:
        for name, ds in (node.get("datasets") or {}).items():
            args = ds["args"]
            key = (args["hf_args"]["data_files"], args["answer_key"], bool(args.get("predict_with_generate")))
            seen.setdefault(key, {name: ds})

    from omegaconf import OmegaConf

    _walk(OmegaConf.to_container(eval_cfg), collect)
    compared = 0
    for (path, column, generate), ds_cfg in sorted(seen.items()):
        ds = get_datasets(dataset_cfgs=OmegaConf.create(ds_cfg), tokenizer=tok, template_args=template_args)
        rows = data[Path(path).stem]
        assert len(ds) == len(rows), f"{path}: {len(ds)} rows in the reference's dataset, {len(rows)} in ours"
        for i, row in enumerate(rows):
            item = ds[i]
            answers = row[column] if isinstance(row[column], list) else [row[column]]
            items = [item[j] for j in range(len(answers))] if isinstance(row[column], list) else [item]
            for answer, got in zip(answers, items, strict=True):
                if generate:
                    want = {"input_ids": encode_prompt(tok, row["question"], fmt=opts.prompt)}
                else:
                    want = encode_qa(
                        tok, row["question"], answer, max_length=opts.max_length, fmt=opts.prompt
                    )
                for field, ids in want.items():
                    if got[field].tolist() != ids:
                        raise AssertionError(
                            f"{Path(path).stem} row {i} {column} ({'prompt' if generate else 'scored'}): "
                            f"reference {field} {got[field].tolist()} != ours {ids}"
                        )
                compared += 1
    return compared


# ---------------------------------------------------------------- the two metric loops


def reference_loop(
    eval_cfg: DictConfig, model: torch.nn.Module, tok: Any, template_args: dict, keep: Path | None = None
) -> tuple[float, dict[str, float]]:
    """One run of the reference's ``Evaluator.evaluate`` (timed) into a fresh output dir (with
    ``overwrite: false`` an existing logs file would be reused); returns the seconds and every
    agg_value of its logs (pre_compute results included). ``keep``: copy the logs file there."""
    from evals.tofu import TOFUEvaluator
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory(prefix="ref-eval-") as out:
        cfg = OmegaConf.merge(eval_cfg, {"output_dir": out})
        evaluator = TOFUEvaluator(cfg)
        with contextlib.redirect_stdout(io.StringIO()):  # its per-metric "Evaluated N examples"
            start = time.perf_counter()
            evaluator.evaluate(model, tokenizer=tok, template_args=template_args)
            seconds = time.perf_counter() - start
        logs = json.loads((Path(out) / "TOFU_EVAL.json").read_text())
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(json.dumps(logs))
    values = {k: float(v["agg_value"]) for k, v in logs.items() if v.get("agg_value") is not None}
    return seconds, values


@contextlib.contextmanager
def phase_timer(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """Seconds in each of ``PHASES`` (the rest of the loop is "other"), plus the sequences the
    model's forward calls carry in each (``<phase>_sequences``), while the block runs."""
    import importlib

    current = {"name": "other"}
    stats: dict[str, float] = defaultdict(float)

    def timed(phase: str, fn):
        def wrapped(*args, **kwargs):
            current["name"] = phase
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stats[phase] += time.perf_counter() - start
                current["name"] = "other"

        return wrapped

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        stats[f"{current['name']}_forwards"] += 1
        stats[f"{current['name']}_sequences"] += int(ids.shape[0]) if ids is not None else 0

    originals = []
    for phase, (module_name, attr) in PHASES.items():
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):  # moved: its time shows as "other" until PHASES follows
            print(f"warning: {module_name}.{attr} not found, phase {phase} not timed", file=sys.stderr)
            continue
        originals.append((module, attr, getattr(module, attr)))
        setattr(module, attr, timed(phase, getattr(module, attr)))
    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield stats
    finally:
        handle.remove()
        for module, attr, fn in originals:
            setattr(module, attr, fn)


def ours_loop(
    model: torch.nn.Module,
    tok: Any,
    data: dict[str, list[dict]],
    layout: Layout,
    metrics: list[str],
    opts: SuiteOptions,
    oracle: dict[str, list[dict]],
) -> tuple[float, dict[str, float], dict]:
    """One run of our suite as stages/evaluate.py calls it (timed): ``evaluate_splits`` then
    ``relative_metrics`` against the oracle's per-sample rows. Returns seconds, numbers, phases."""
    from unlearnflow.metrics import evaluate_splits, relative_metrics

    model.zero_grad(set_to_none=True)  # the reference's gradient-norm attack leaves gradients behind
    with phase_timer(model) as phases:
        start = time.perf_counter()
        result = evaluate_splits(model, tok, data, layout, metrics=metrics, device="cpu", opts=opts)
        relative = relative_metrics(result, layout, oracle, metrics)
        seconds = time.perf_counter() - start
    phases = dict(phases)
    phases["other"] = seconds - sum(phases.get(p, 0.0) for p in PHASES)
    return seconds, {**result.aggregates, **relative}, phases


# ---------------------------------------------------------------- setup shared by both modes


def load_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Model, tokenizer, capped splits, our suite options and metric list (nothing evaluated)."""
    import torch

    from unlearnflow import modeling
    from unlearnflow.config import EvaluateConfig, ModelConfig, load_section
    from unlearnflow.data import splits as split_io
    from unlearnflow.data.tokenize import PromptFormat
    from unlearnflow.metrics import SuiteOptions

    torch.set_num_threads(args.threads)
    cfg = load_section(args.params, "evaluate", EvaluateConfig)
    model_cfg = load_section(args.params, "model", ModelConfig)
    fmt = PromptFormat(**model_cfg.prompt_kwargs())
    if fmt.chat:
        sys.exit("model.chat_template is set: this bench compares the plain prompt format only")
    layout = split_io.read_layout(args.splits)
    missing = set(REFERENCE_SPLITS.values()) - set(layout.evaluated())
    if missing or layout.mia != ("forget", "holdout"):
        sys.exit(f"{args.splits}: not a TOFU-format layout (missing {sorted(missing)} or forget/holdout MIA)")
    data = split_io.read_splits(args.splits, layout.evaluated())
    data = {k: rows[: args.max_rows] if args.max_rows else rows for k, rows in data.items()}
    options = {**cfg.suite_options(model_cfg.max_length), "max_samples": None}
    options["max_new_tokens"] = options["max_new_tokens"] or layout.max_new_tokens
    return {
        "tok": modeling.load_tokenizer(args.model),
        "model": modeling.load_model(args.model),
        "layout": layout,
        "data": data,
        "metrics": cfg.metrics,
        "opts": SuiteOptions(**options, prompt=fmt),
        "template": plain_template(fmt.template),
    }


def ours_oracle_rows(args: argparse.Namespace, inp: dict[str, Any], folder: Path) -> dict[str, list[dict]]:
    """The oracle's per-sample rows as our evaluate stage writes and re-reads them (untimed)."""
    from unlearnflow import modeling
    from unlearnflow.io import read_jsonl, write_jsonl
    from unlearnflow.metrics import evaluate_splits

    folder.mkdir(parents=True, exist_ok=True)
    oracle = modeling.load_model(args.oracle)
    result = evaluate_splits(
        oracle, inp["tok"], inp["data"], inp["layout"], metrics=inp["metrics"], device="cpu", opts=inp["opts"]
    )
    for split, rows in result.per_sample.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    return {p.stem: read_jsonl(p) for p in sorted(folder.glob("*.jsonl"))}


def reference_setup(args: argparse.Namespace, inp: dict[str, Any], work: Path) -> dict[str, Any]:
    """Data files and config of the reference; its oracle logs (untimed) for forget_quality and
    privleak, as ``retain_logs_path`` expects them."""
    files = write_reference_data(inp["data"], work / "reference_data", inp["template"][1])
    setup = {
        "batch_size": inp["opts"].batch_size,
        "max_length": inp["opts"].max_length,
        "max_new_tokens": inp["opts"].max_new_tokens,
        "reference_model_path": str(args.oracle),
        "retain_logs_path": None,
        "output_dir": str(work / "reference_runs"),  # replaced by a fresh temp dir per run
    }
    oracle_cfg = reference_config(args.reference, REFERENCE_ORACLE_METRICS, files, setup)
    from transformers import AutoModelForCausalLM

    logs = work / "reference_oracle" / "TOFU_EVAL.json"
    oracle = AutoModelForCausalLM.from_pretrained(str(args.oracle))
    reference_loop(oracle_cfg, oracle, inp["tok"], inp["template"][0], keep=logs)
    return {"files": files, "setup": {**setup, "retain_logs_path": str(logs)}}


# ---------------------------------------------------------------- the whole-process child


def child(args: argparse.Namespace) -> None:
    """``--child ours|reference``: a fresh process that loads what it needs and runs one loop;
    prints its loop seconds as JSON (the parent times the whole process)."""
    spec = json.loads((args.workdir / "child.json").read_text())
    import torch

    torch.set_num_threads(args.threads)  # as in the parent: both evaluators on the same threads
    if args.child == "reference":
        import_reference(args.reference)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        files = {k: Path(v) for k, v in spec["files"].items()}
        eval_cfg = reference_config(args.reference, REFERENCE_METRICS, files, spec["setup"])
        model = AutoModelForCausalLM.from_pretrained(str(args.model))
        tok = AutoTokenizer.from_pretrained(str(args.model))
        seconds, _ = reference_loop(eval_cfg, model, tok, spec["template_args"])
    else:
        from unlearnflow.io import read_jsonl

        inp = load_inputs(args)
        oracle = {p.stem: read_jsonl(p) for p in sorted((args.workdir / "oracle_samples").glob("*.jsonl"))}
        seconds, _, _ = ours_loop(
            inp["model"], inp["tok"], inp["data"], inp["layout"], inp["metrics"], inp["opts"], oracle
        )
    print(json.dumps({"loop_s": seconds}))


def whole_process(args: argparse.Namespace, which: str) -> dict[str, float]:
    """Wall time of one fresh ``--child`` process, and the loop seconds it reports."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, *child_args(args)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"--child {which} failed:\n{done.stderr[-3000:]}")
    return {"process_s": wall, "loop_s": json.loads(done.stdout.strip().splitlines()[-1])["loop_s"]}


def child_args(args: argparse.Namespace) -> list[str]:
    return [
        *("--reference", str(args.reference), "--model", str(args.model), "--oracle", str(args.oracle)),
        *("--splits", str(args.splits), "--params", str(args.params), "--workdir", str(args.workdir)),
        *("--threads", str(args.threads)),
        *(["--max-rows", str(args.max_rows)] if args.max_rows else []),
    ]


# ---------------------------------------------------------------- comparison and report


def compare(ours: dict[str, float], ref: dict[str, float], definitions: str) -> list[dict[str, Any]]:
    """Per pair of ``PAIRS``: both values, their relative difference |a − b| / max(|a|, |b|) and a
    verdict: "same" (≤ ``TOLERANCE``), the documented convention that explains a difference (only
    under ``definitions: unlearnflow``), or "differs"."""
    rows = []
    for mine, theirs in PAIRS.items():
        a, b = ours.get(mine), ref.get(theirs)
        diff = None if a is None or b is None else abs(a - b) / (max(abs(a), abs(b)) or 1.0)
        if diff is None:
            verdict = "not computed"
        elif diff <= TOLERANCE:
            verdict = "same"
        elif definitions == "unlearnflow" and mine in CONVENTIONS:
            verdict = f"differs by convention: {CONVENTIONS[mine]}"
        else:
            verdict = "**differs**"
        pair = {"ours": mine, "reference": theirs, "ours_value": a, "reference_value": b}
        rows.append({**pair, "rel_diff": diff, "verdict": verdict})
    return rows


def summary(times: list[float]) -> dict[str, float]:
    """Min, median and max of one evaluator's loop seconds."""
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="open-unlearning checkout")
    parser.add_argument("--reference-commit", default=None, help="its commit, recorded in the report")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "target")
    parser.add_argument("--oracle", type=Path, default=None, help="default: models/oracle, else --model")
    parser.add_argument("--splits", type=Path, default=ROOT / "data" / "splits")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--process-rounds", type=int, default=None, help="whole-process runs (default 1)")
    parser.add_argument("--max-rows", type=int, default=None, help="cap every split at its first N rows")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 round, 24 rows, no whole process")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "eval-vs-reference.md")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default: a temp dir)")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.max_rows = 1, args.max_rows or 24
        args.process_rounds = 0 if args.process_rounds is None else args.process_rounds
    args.process_rounds = 1 if args.process_rounds is None else args.process_rounds
    if args.oracle is None:
        default = ROOT / "models" / "oracle"
        args.oracle = default if default.exists() else args.model
    for path in (args.model, args.oracle, args.splits):
        if not path.exists():
            sys.exit(f"{path} not found: run `dvc repro finetune@target finetune@oracle` first")
    if args.child:
        return child(args)
    args.load_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            args.workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eval-vs-ref-")))
        os.environ.setdefault("HF_DATASETS_CACHE", str(args.workdir / "hf_datasets"))
        run(args)


def run(args: argparse.Namespace) -> None:
    """Set up both evaluators, check the inputs, time the loops, compare, write the report."""
    import_reference(args.reference)
    inp = load_inputs(args)
    model, tok, template_args = inp["model"], inp["tok"], inp["template"][0]
    log(f"oracle {args.oracle}: its logs (reference) and per-sample rows (ours), untimed")
    ref = reference_setup(args, inp, args.workdir)
    oracle = ours_oracle_rows(args, inp, args.workdir / "oracle_samples")
    eval_cfg = reference_config(args.reference, REFERENCE_METRICS, ref["files"], ref["setup"])
    log(f"token check against the reference's QADataset ({sum(map(len, inp['data'].values()))} rows)")
    checked = check_tokens(eval_cfg, tok, template_args, inp["data"], inp["opts"])
    log(f"{checked} sequences token-identical")
    loop_args = (model, tok, inp["data"], inp["layout"], inp["metrics"], inp["opts"], oracle)
    log("warm-up: one untimed loop each")
    reference_loop(eval_cfg, model, tok, template_args)
    ours_loop(*loop_args)
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    phases: list[dict] = []
    for r in range(args.rounds):
        seconds, ref_values = reference_loop(eval_cfg, model, tok, template_args)
        times["reference"].append(seconds)
        seconds, our_values, our_phases = ours_loop(*loop_args)
        times["ours"].append(seconds)
        phases.append(our_phases)
        log(f"round {r + 1}/{args.rounds}: reference {times['reference'][-1]:.2f} s, ours {seconds:.2f} s")
    processes = {"reference": [], "ours": []}
    if args.process_rounds:
        spec = {"files": {k: str(v) for k, v in ref["files"].items()}, "template_args": template_args}
        spec["setup"] = ref["setup"]
        (args.workdir / "child.json").write_text(json.dumps(spec))
        for _ in range(args.process_rounds):
            for which in ("reference", "ours"):
                processes[which].append(whole_process(args, which))
                log(f"whole process {which}: {processes[which][-1]['process_s']:.2f} s")
    record = build_record(
        args, inp, checked, times, phases, processes, compare(our_values, ref_values, inp["opts"].definitions)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.write_text(render(record))
    print(render(record))


def log(message: str) -> None:
    print(f"[eval-vs-reference] {message}", file=sys.stderr, flush=True)


def _rel(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def build_record(
    args: argparse.Namespace,
    inp: dict[str, Any],
    checked: int,
    times: dict[str, list[float]],
    phases: list[dict],
    processes: dict[str, list[dict]],
    numbers: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything the report shows, as written to the JSON file."""
    import torch
    import transformers

    from unlearnflow import modeling

    ref_s, ours_s = summary(times["reference"]), summary(times["ours"])
    phase_keys = [*PHASES, "other"]
    median_phase = {p: statistics.median(ph.get(p, 0.0) for ph in phases) for p in phase_keys}
    counts = {k: v for k, v in phases[-1].items() if k.endswith(("_forwards", "_sequences"))}
    command = ["python", "bench/eval_vs_reference.py", "--reference", str(args.reference)]
    command += ["--model", _rel(args.model), "--oracle", _rel(args.oracle), "--splits", _rel(args.splits)]
    command += ["--rounds", str(args.rounds), "--process-rounds", str(args.process_rounds)]
    command += ["--threads", str(args.threads)]
    command += ["--max-rows", str(args.max_rows)] if args.max_rows else []
    command += ["--reference-commit", args.reference_commit] if args.reference_commit else []
    command += ["--out", _rel(args.out)]
    return {
        "command": shlex.join(command),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({args.threads} torch threads), "
        f"torch {torch.__version__}, transformers {transformers.__version__}",
        # other work on the machine slows both evaluators: the 1-minute load before and after
        "load_average": {"start": args.load_start, "end": os.getloadavg()[0]},
        "reference": {"path": str(args.reference), "commit": args.reference_commit or "not given"},
        "model": _rel(args.model),
        "oracle": _rel(args.oracle),
        "parameters": modeling.count_parameters(inp["model"]),
        "rows": {k: len(v) for k, v in inp["data"].items()},
        "batch_size": inp["opts"].batch_size,
        "max_new_tokens": inp["opts"].max_new_tokens,
        "max_length": inp["opts"].max_length,
        "our_metrics": inp["metrics"],
        "reference_metrics": REFERENCE_METRICS,
        "template_args": inp["template"][0],
        "answer_prefix": inp["template"][1],
        "sequences_token_checked": checked,
        "rounds": args.rounds,
        "loop_seconds": {"reference": times["reference"], "ours": times["ours"]},
        "loop_summary": {"reference": ref_s, "ours": ours_s},
        "ratio_reference_over_ours": {
            "min": ref_s["min"] / ours_s["min"],
            "median": ref_s["median"] / ours_s["median"],
        },
        "our_phases_per_round": phases,
        "our_phase_median_seconds": median_phase,
        "our_phase_share": {p: v / ours_s["median"] for p, v in median_phase.items()},
        "our_phase_counts": counts,
        "whole_process": processes,
        "numbers": numbers,
        "tolerance": TOLERANCE,
        "definitions": inp["opts"].definitions,
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def render(record: dict[str, Any]) -> str:
    """The markdown report of ``build_record``'s record."""
    ref_s, ours_s = record["loop_summary"]["reference"], record["loop_summary"]["ours"]
    ratio = record["ratio_reference_over_ours"]
    rows, load = record["rows"], record["load_average"]
    lines = [
        "# Our evaluator against open-unlearning's, on identical work",
        "",
        f"Reproduce: `{record['command']}`",
        f"(reference: a checkout of locuslab/open-unlearning, commit {record['reference']['commit']};",
        "extract one with `git archive`, its code is imported, never copied). One run on",
        f"{record['machine']}; 1-minute load average {load['start']:.1f} before the run, {load['end']:.1f} "
        + (
            "after: other work was running, both evaluators were slowed (contended)."
            if load["start"] >= 1.0
            else "after (the bench's own threads): an otherwise idle machine."
        ),
        f"Model `{record['model']}` ({record['parameters']:,} parameters), oracle",
        f"`{record['oracle']}`; rows per split: {', '.join(f'{k} {v}' for k, v in rows.items())}.",
        "",
        "Both evaluators get the same model object, the same rows and the same work: the 23 numbers of",
        "our default TOFU suite (the reference's metric configs: "
        + ", ".join(f"`{m}`" for m in record["reference_metrics"])
        + "; `model_utility` computes its nine retain / real-authors / world-facts components),",
        f"batch size {record['batch_size']}, greedy generation capped at {record['max_new_tokens']} new tokens,",
        f"token cap {record['max_length']}. The reference reads our splits as local JSON files with its",
        f"non-chat template args `{json.dumps(record['template_args'])}` and every answer prefixed by",
        f"{json.dumps(record['answer_prefix'])} (the space after `Answer:`: its shipped Llama-2 tags end",
        "`asst_start_tag` with it, which this byte-level tokenizer makes a token of its own, so the",
        "reference would count each answer's first token as prompt). Before timing, all "
        f"{record['sequences_token_checked']:,} sequences its",
        "`QADataset` builds (answers, paraphrases, perturbed answers, generation prompts) were checked",
        "token for token against ours (`input_ids` and `labels`).",
        "",
        "The *metric loop* is timed from the first metric to the last, model loaded: the reference's",
        "`Evaluator.evaluate` (its datasets are built inside it, its oracle model is loaded by",
        "`mia_reference`, its logs written after each metric, as it always runs) and ours",
        "`evaluate_splits` + `relative_metrics` (as `stages/evaluate.py` calls them; the oracle's",
        "per-sample rows read from its own earlier evaluation). One untimed warm-up each, then",
        f"alternating reference / ours, {record['rounds']} round(s).",
        "",
        "| metric loop | min s | median s | max s |",
        "|---|---|---|---|",
        f"| reference (open-unlearning) | {ref_s['min']:.2f} | {ref_s['median']:.2f} | {ref_s['max']:.2f} |",
        f"| ours (unlearnflow) | {ours_s['min']:.2f} | {ours_s['median']:.2f} | {ours_s['max']:.2f} |",
        f"| **ratio reference / ours** | **{ratio['min']:.2f}×** | **{ratio['median']:.2f}×** | |",
        "",
    ]
    processes = record["whole_process"]
    if processes["ours"]:
        lines += [
            "Whole process: a fresh `python` running this script's `--child` mode, which does what the",
            "reference's `src/eval.py` does (imports, hydra-composed config, model and tokenizer load, the",
            "loop) or what ours needs (imports, params, model, splits, the oracle's rows, the loop); a cold",
            "process pays its first-call costs inside the loop (its loop seconds in brackets):",
            "",
            "| whole process | seconds (loop) |",
            "|---|---|",
            *(
                f"| {which} | "
                + ", ".join(f"{p['process_s']:.2f} ({p['loop_s']:.2f})" for p in processes[which])
                + " |"
                for which in ("reference", "ours")
            ),
            "",
        ]
    share, med = record["our_phase_share"], record["our_phase_median_seconds"]
    counts = record["our_phase_counts"]
    names = {
        "scoring": "batched scoring",
        "generation": "greedy generation",
        "grad_norm": "per-sample grad norms",
    }
    lines += [
        "Our loop by phase (median over the rounds; forward calls and the sequences they carry, last round):",
        "",
        "| phase | median s | share | forwards | sequences |",
        "|---|---|---|---|---|",
        *(
            f"| {names.get(p, 'other (metric maths, AUCs, ROUGE, encoding)')} | {med[p]:.2f} | {share[p]:.0%} "
            f"| {int(counts.get(f'{p}_forwards', 0))} | {int(counts.get(f'{p}_sequences', 0))} |"
            for p in med
        ),
        "",
        f"Numbers check (relative difference |a − b| / max(|a|, |b|); the same number below {record['tolerance']:g}):",
        "",
        "| ours | reference | ours value | reference value | rel. diff | |",
        "|---|---|---|---|---|---|",
    ]
    for n in record["numbers"]:
        diff = n["rel_diff"]
        lines.append(
            f"| `{n['ours']}` | `{n['reference']}` | {_fmt(n['ours_value'])} | {_fmt(n['reference_value'])} "
            f"| {'—' if diff is None else f'{diff:.1e}'} | {n['verdict']} |"
        )
    same = sum(1 for n in record["numbers"] if n["verdict"] == "same")
    lines += [
        "",
        f"{same} of {len(record['numbers'])} numbers the same, with `evaluate.definitions: "
        f"{record['definitions']}`. Under `reference` every formula is open-unlearning's (docs/metrics.md);",
        "the differences that remain there (the final token of a target cut by `max_length`, ROUGE against",
        "a cut answer's decoded labels) cannot arise here: the token check compared the reference's labels,",
        "EOS included, so no target was cut. Nonzero differences below the tolerance are float32 rounding:",
        "the two evaluators batch and pad the same sequences differently.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
