"""One evaluation of one model: load it, optionally change it (an attack), run the metric suite
against the oracle's rows, write ``metrics.json``, ``info.json`` and ``samples/`` and log the MLflow
run. Shared by the ``evaluate`` stage (a model as it is) and the ``attack`` stage (each attack of a
list, in turn, in one process)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unlearnflow import cli, modeling, tracking
from unlearnflow.config import ComputeConfig, EvaluateConfig, ModelConfig, load_section
from unlearnflow.data import splits as split_io
from unlearnflow.errors import DataError, UnlearnflowError
from unlearnflow.io import read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger("evaluate")
WEIGHT_CHANGE_FILE = "weight_change.json"  # written by unlearn beside the unlearned checkpoint
ROLES = ("target", "oracle", "unlearned")

# Changes a freshly loaded model before it is evaluated (an attack): gets the model, the tokenizer
# and the open run; returns info.json entries and, per split, row indices not to evaluate.
Change = Callable[[Any, Any, "tracking.StageRun"], tuple[dict[str, Any], dict[str, frozenset[int]]]]


def oracle_rows(reference: str) -> dict[str, list[dict]] | None:
    """The oracle's per-sample rows from its evaluate output (None for the oracle itself).

    Each file must be what evaluate writes: JSON objects with an integer ``index`` and the same
    columns on every row. A hand-edited or truncated file is a one-line ``DataError`` here, not a
    ``KeyError`` deep inside the relative metrics.
    """
    if reference == "self":
        return None
    folder = Path(reference)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UnlearnflowError(f"no oracle per-sample files in {folder} (evaluate the oracle first)")
    out = {}
    for f in files:
        rows = read_jsonl(f)
        columns = set(rows[0]) if rows else set()
        for n, row in enumerate(rows, start=1):
            if not isinstance(row.get("index"), int) or set(row) != columns:
                differ = ", ".join(sorted(columns ^ set(row))) or "index is not an integer"
                raise DataError(
                    f"{f} row {n}: not an oracle per-sample row like row 1 ({differ}); "
                    "re-run the oracle's evaluate"
                )
        out[f.stem] = rows
    return out


def model_info(name: str, role: str | None, model: Path, **identity: Any) -> dict[str, Any]:
    """info.json's identity of a model: ``model`` (its role: ``role``, else target / oracle by
    ``name``, else unlearned), the ``identity`` fields (method, optimizer, attack, seed), and the
    unlearning's weight change from the target when the checkpoint carries one."""
    kind = role or (name if name in ("target", "oracle") else "unlearned")
    if kind not in ROLES:
        raise UnlearnflowError(f"--role must be one of {', '.join(ROLES)}, got {kind!r}")
    info = {"model": kind, **identity}
    if (model / WEIGHT_CHANGE_FILE).is_file():
        info["weight_change"] = read_json(model / WEIGHT_CHANGE_FILE)
    return info


class Evaluation:
    """What every evaluation of one model shares: settings, splits, tokenizer, the oracle's rows
    (``oracle``: its per-sample directory, or ``self`` for the oracle)."""

    def __init__(
        self,
        cfg: EvaluateConfig,
        model_cfg: ModelConfig,
        layout: Any,
        model: Path,
        splits: Path,
        device: Any,
        oracle: str,
        experiment: str,
    ) -> None:
        self.cfg, self.model_cfg, self.layout = cfg, model_cfg, layout
        self.model, self.splits, self.device = model, splits, device
        self.oracle, self.experiment = oracle, experiment
        # Read before any run opens: a malformed oracle file is one line, with no run left behind.
        self.reference = oracle_rows(oracle)
        self.tokenizer: Any = None
        self.data: dict[str, list[dict]] | None = None

    @classmethod
    def from_params(cls, model: Path, splits: Path, oracle: str, params: Path) -> Evaluation:
        """Settings, layout and the oracle's rows from ``params``, every one checked before any model
        loads (the metrics must give every number the report needs)."""
        from unlearnflow.metrics.relative import check_metrics

        cfg = load_section(params, "evaluate", EvaluateConfig)
        layout = split_io.read_layout(splits)
        check_metrics(layout, cfg.metrics)
        model_cfg = load_section(params, "model", ModelConfig)
        device = modeling.pick_device(load_section(params, "compute", ComputeConfig).device)
        return cls(cfg, model_cfg, layout, model, splits, device, oracle, cli.experiment_name(params))

    def run(
        self,
        item: str,
        info: dict[str, Any],
        where: Path,
        *,
        change: Change | None = None,
        logged_params: dict[str, Any] | None = None,
    ) -> None:
        """Load the model, apply ``change`` (None: as it is), evaluate, write ``where`` and log the
        run (named ``evaluate-<item>``; ``logged_params`` beside the evaluate section)."""
        from unlearnflow.data.tokenize import PromptFormat
        from unlearnflow.metrics import SuiteOptions, evaluate_splits, facts, relative_metrics

        cfg, model_cfg, layout = self.cfg, self.model_cfg, self.layout
        logged: dict[str, Any] = {"evaluate": cfg.model_dump(), **(logged_params or {})}
        upstream = [self.model / "run.json", self.splits / "run.json"]
        with tracking.stage_run(
            "evaluate", item, experiment=self.experiment, params=logged, upstream=upstream
        ) as run:
            run.set_tags({k: str(v) for k, v in info.items() if v is not None and k != "weight_change"})
            trust = model_cfg.trust_remote_code
            if self.tokenizer is None:
                self.tokenizer = modeling.load_tokenizer(self.model, trust_remote_code=trust)
                self.data = split_io.read_splits(self.splits, layout.evaluated())
            tok, data = self.tokenizer, self.data
            assert data is not None
            start = time.perf_counter()
            net = modeling.load_model(self.model, device=self.device, trust_remote_code=trust)
            seconds = {"load": time.perf_counter() - start}
            info = dict(info)
            exclude: dict[str, frozenset[int]] = {}
            if change is not None:
                start = time.perf_counter()
                extra, exclude = change(net, tok, run)
                info |= extra
                net.eval()
                seconds["attack"] = time.perf_counter() - start
            start = time.perf_counter()
            reference = self.reference
            if reference is not None and exclude:
                # The oracle side of forget_quality / privleak on the same rows as this model's.
                reference = {
                    split: [r for r in rows if r["index"] not in exclude.get(split, ())]
                    for split, rows in reference.items()
                }
            result = evaluate_splits(
                net,
                tok,
                data,
                layout,
                metrics=cfg.metrics,
                device=self.device,
                opts=SuiteOptions(
                    **cfg.suite_options(model_cfg.max_length),
                    prompt=PromptFormat(**model_cfg.prompt_kwargs()),
                    exclude=exclude,
                ),
            )
            del net
            relative = relative_metrics(
                result,
                layout,
                result.per_sample if reference is None else reference,
                cfg.metrics,
                oracle_dir=None if reference is None else self.oracle,
            )
            # Per-fact answer to the forget request: each generated forget answer leaked / refused /
            # degenerate / wrong, as per-sample columns, counts and one verdict line (info.json).
            fact_split = facts.fact_split(layout, result.per_sample)
            counts: dict[str, float] = {}
            if fact_split is not None:
                rows = facts.fact_rows(
                    result.per_sample[fact_split],
                    cfg.secret_field,
                    cfg.leak_threshold,
                    source_rows=data[fact_split],
                )
                result.per_sample[fact_split] = rows
                counts = facts.fact_counts(rows)
                info["facts"] = {"split": fact_split, "verdict": facts.verdict(item, rows)}
                log.info("%s", info["facts"]["verdict"])
                run.set_tags({"facts.verdict": info["facts"]["verdict"]})
            # Wall time of each phase (the study's breakdown by stage): info.json, and the run.
            seconds["evaluate"] = time.perf_counter() - start
            info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            run.log_metrics({f"seconds.{k}": v for k, v in seconds.items()})
            # An undefined number (no oracle, no such split) is left out, not written as NaN.
            every = {**result.aggregates, **relative, **counts}
            metrics = {k: v for k, v in every.items() if not math.isnan(v)}
            for split, rows in result.per_sample.items():
                write_jsonl(where / "samples" / f"{split}.jsonl", rows)
            run.write_manifest(where / "samples" / "run.json")
            write_json(where / "info.json", info)
            write_json(where / "metrics.json", metrics)
            run.log_metrics(metrics)
            for split in result.per_sample:
                run.log_artifact(where / "samples" / f"{split}.jsonl", "samples")
