"""report: row order and keys, summary round-trip, markdown table, trade-off PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import write_json
from unlearnflow.report import (
    collect_rows,
    format_value,
    plot_tradeoff,
    write_markdown,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval_dir(root: Path, name: str, info: dict, metrics: dict) -> Path:
    d = root / "eval" / name
    write_json(d / "info.json", info)
    write_json(d / "metrics.json", metrics)
    return d


def _metrics(fq: float, mu: float, forget_prob: float) -> dict:
    return {
        "forget_quality": fq,
        "model_utility": mu,
        "forget_prob": forget_prob,
        "forget_rouge": 0.5,
        "retain_prob": 0.9,
        "world_facts_rouge": float("nan"),
    }


@pytest.fixture
def eval_dirs(tmp_path: Path) -> list[Path]:
    """Four models, written in an order that differs from the report order."""
    none = {"method": None, "optimizer": None, "attack": None}
    return [
        _eval_dir(
            tmp_path,
            "npo-adamw-relearn",
            {"model": "unlearned", "method": "npo", "optimizer": "adamw", "attack": "relearn"},
            _metrics(0.0, 0.41, 0.2),
        ),
        _eval_dir(tmp_path, "oracle", {"model": "oracle", **none}, _metrics(1.0, 0.62, 0.1)),
        _eval_dir(
            tmp_path,
            "npo-adamw",
            {"model": "unlearned", "method": "npo", "optimizer": "adamw", "attack": None},
            _metrics(0.000123456, 0.5, 0.123456789),
        ),
        _eval_dir(tmp_path, "target", {"model": "target", **none}, _metrics(1.5e-12, 0.63, 0.99)),
    ]


def test_collect_rows_order_and_keys(eval_dirs: list[Path]) -> None:
    rows = collect_rows(eval_dirs)
    assert [(r["model"], r["attack"]) for r in rows] == [
        ("target", None),
        ("oracle", None),
        ("unlearned", None),  # no attack sorts before "relearn"
        ("unlearned", "relearn"),
    ]
    assert list(rows[0])[:4] == ["model", "method", "optimizer", "attack"]
    assert rows[0]["method"] is None and rows[2]["method"] == "npo"
    assert set(rows[3]) == {"model", "method", "optimizer", "attack", *_metrics(0, 0, 0)}
    assert math.isnan(rows[0]["world_facts_rouge"])


def test_unattacked_model_leads_its_attacks(eval_dirs: list[Path], tmp_path: Path) -> None:
    """Attack "none" sorts before every real attack, even those that sort before it alphabetically."""
    extra = [
        _eval_dir(
            tmp_path,
            f"npo-sgd-{a}",
            {"model": "unlearned", "method": "npo", "optimizer": "sgd", "attack": a},
            _metrics(0.5, 0.5, 0.5),
        )
        for a in ("noise", "none")
    ]
    rows = collect_rows([*eval_dirs, *extra])
    assert [r["attack"] for r in rows if r["optimizer"] == "sgd"] == ["none", "noise"]


def test_collect_rows_missing_file(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    with pytest.raises(UnlearnflowError, match=r"info\.json is missing"):
        collect_rows([tmp_path / "broken"])


def test_summary_round_trip(eval_dirs: list[Path], tmp_path: Path) -> None:
    rows = collect_rows(eval_dirs)
    path = tmp_path / "reports" / "summary.json"
    write_summary(rows, path)
    back = json.loads(path.read_text())
    assert [r["model"] for r in back] == ["target", "oracle", "unlearned", "unlearned"]
    for got, want in zip(back, rows, strict=True):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert (isinstance(v, float) and math.isnan(v) and math.isnan(got[k])) or got[k] == v


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("forget_prob", 0.123456789, "0.1235"),
        ("forget_prob", 1234.5678, "1235"),
        ("forget_quality", 0.000123456, "1.235e-04"),  # < 1e-3: scientific
        ("forget_quality", 0.0, "0.000e+00"),
        ("forget_quality", 0.5, "0.5"),
        ("model_utility", float("nan"), "–"),
        ("method", None, "–"),
        ("method", "npo", "npo"),
    ],
)
def test_format_value(key: str, value: object, text: str) -> None:
    assert format_value(key, value) == text


def test_markdown_table(eval_dirs: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "reports" / "report.md"
    write_markdown(collect_rows(eval_dirs), path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert any("forget_quality" in line and "KS" in line for line in lines)  # legend
    header = next(line for line in lines if line.startswith("| model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "model",
        "method",
        "optimizer",
        "attack",
        "forget_quality",
        "model_utility",
        "forget_prob",
        "forget_rouge",
        "retain_prob",
        "world_facts_rouge",
    ]
    body = [line for line in lines if line.startswith("| ") and line is not header]
    assert len(body) == 4
    assert body[0].startswith("| target | – | – | – | 1.500e-12 | 0.63 | 0.99 |")
    assert body[2].startswith("| unlearned | npo | adamw | – | 1.235e-04 | 0.5 | 0.1235 |")
    assert body[2].endswith("| – |")  # NaN world_facts_rouge


def test_tradeoff_png(eval_dirs: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "reports" / "tradeoff.png"
    plot_tradeoff(collect_rows(eval_dirs), path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["tradeoff.png"]  # no temp file left behind


def test_tradeoff_falls_back_to_privleak_without_forget_quality(tmp_path: Path, monkeypatch) -> None:
    """MUSE-like rows (no forget_quality) are plotted on privleak; the y label says so."""
    from matplotlib.axes import Axes

    labels: list[str] = []
    real = Axes.set_ylabel
    monkeypatch.setattr(
        Axes, "set_ylabel", lambda self, text, *a, **k: labels.append(text) or real(self, text)
    )
    rows = [
        {"model": "target", "model_utility": 0.6, "privleak": -98.0},
        {"model": "oracle", "model_utility": 0.62, "privleak": 0.0},
        {
            "model": "unlearned",
            "method": "npo",
            "optimizer": "adamw",
            "model_utility": 0.5,
            "privleak": -20.0,
        },
    ]
    path = tmp_path / "tradeoff.png"
    plot_tradeoff(rows, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert labels == ["privleak (0 = oracle, −100 = forget set recognised)"]
