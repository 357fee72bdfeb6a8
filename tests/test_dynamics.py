"""The report's methods table and per-step diagnostic figures (dynamics), alone and through the stage."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import ROOT, eval_dir, run_report_stage

from unlearnflow.dynamics import methods_table, plot_dynamics, read_run
from unlearnflow.io import write_json, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _item(root: Path, name: str, *, lr: float, wall: float, rows: list[dict]) -> Path:
    d = root / "unlearned" / name
    write_json(
        d / "item.json",
        {
            "unlearn": {"lr": lr, "epochs": 5.0},
            "method": {"name": "pdu", "gamma": 1.0, "dual_lr": 5.0, "lr": lr},
            "optimizer": {"name": "adamw", "eps": 1e-8},
            "schedule_from": {"lr": "unlearn.method_args.pdu.lr", "epochs": "unlearn.epochs"},
            "steps": len(rows),
            "wall_time_s": wall,
        },
    )
    write_jsonl(d / "steps.jsonl", rows)
    return d


def _pdu_rows(lams: list[float]) -> list[dict]:
    return [
        {"step": i + 1, "loss": 1.0, "lambda": lam, "constraint": 0.1 - 0.05 * i, "forget_loss": 2.0}
        for i, lam in enumerate(lams)
    ]


def test_methods_table_shows_what_ran(tmp_path: Path) -> None:
    """Two seeds of pdu × adamw: one row; wall time is the median of {3, 5} = 4.0; lr names its key;
    the method's own args are listed without name/lr/epochs (those have their own columns)."""
    runs = [
        (
            "pdu",
            "adamw",
            s,
            read_run(_item(tmp_path, f"pdu-adamw-s{s}", lr=2e-4, wall=w, rows=_pdu_rows([1, 2]))),
        )
        for s, w in ((1, 5.0), (0, 3.0))
    ]
    lines = methods_table(runs)
    (row,) = [line for line in lines if line.startswith("| pdu |")]
    assert row == (
        "| pdu | adamw | 0, 1 | 0.0002 (unlearn.method_args.pdu.lr) | 5 (unlearn.epochs) | 2 | 4.0 "
        "| dual_lr=5, gamma=1 | eps=1e-08 |"
    )
    assert methods_table([]) == []


def test_read_run_skips_items_without_logs(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    assert read_run(tmp_path / "old") is None
    d = _item(tmp_path, "x", lr=1e-4, wall=1.0, rows=[])
    (d / "steps.jsonl").write_text("{broken")
    assert read_run(d) is None


def test_plot_only_when_a_diagnostic_is_logged(tmp_path: Path) -> None:
    assert plot_dynamics("pdu", [("adamw", 0, _pdu_rows([100, 101, 99]))], tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    plain = [{"step": 1, "loss": 1.0, "forget_loss": 2.0}]
    assert not plot_dynamics("grad_diff", [("adamw", 0, plain)], tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


def test_report_stage_adds_methods_table_and_dynamics_figure(tmp_path: Path) -> None:
    """A pdu run of two seeds: report.md gets the Methods section and links dynamics-pdu.png."""
    none = {"method": None, "optimizer": None, "attack": None, "seed": None}
    metrics = {"forget_quality": 0.5, "model_utility": 0.6, "forget_prob": 0.2}
    for name, info in (("target", {"model": "target", **none}), ("oracle", {"model": "oracle", **none})):
        write_json(eval_dir(tmp_path, name) / "info.json", info)
        write_json(eval_dir(tmp_path, name) / "metrics.json", metrics)
    for s in (0, 1):
        info = {"model": "unlearned", "method": "pdu", "optimizer": "adamw", "attack": "none", "seed": s}
        write_json(eval_dir(tmp_path, f"pdu-adamw-s{s}-none") / "info.json", info)
        write_json(eval_dir(tmp_path, f"pdu-adamw-s{s}-none") / "metrics.json", metrics)
        _item(tmp_path, f"pdu-adamw-s{s}", lr=2e-4, wall=2.0, rows=_pdu_rows([100, 105, 103]))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["unlearn"].update(pairs=[{"method": "pdu", "optimizer": "adamw"}], seeds=[0, 1])
    params["attack"]["names"] = ["none"]
    params["attack"]["controls"] = []
    run_report_stage(tmp_path, params)
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "## Methods" in text and "| pdu | adamw | 0, 1 |" in text
    assert "![pdu dynamics](dynamics-pdu.png)" in text
    assert (tmp_path / "reports" / "dynamics-pdu.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "reports" / "summary.json").read_text())["groups"]
