"""robustness: before → after each attack (per-seed change, then mean ± sd), relearn read against its
own curve's step 0, target / oracle controls, the note without a baseline, the plots, the stage."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, eval_dir, run_report_stage

from unlearnflow.io import write_json
from unlearnflow.report import collect_rows
from unlearnflow.robustness import (
    attach_attack_info,
    markdown_lines,
    metric_cell,
    plot_quantize,
    plot_relearn,
    read_attack_info,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {"method": None, "optimizer": None, "attack": None, "seed": None}
KINDS = {"none": "none", "quantize_4bit": "quantize", "relearn": "relearn", "noise": "noise"}


def _write(root: Path, name: str, info: dict, metrics: dict) -> Path:
    d = eval_dir(root, name)
    write_json(d / "info.json", info)
    write_json(d / "metrics.json", metrics)
    return d


def _unlearned(root: Path, attack: str, seed: int, metrics: dict, opt: str = "adamw", **extra) -> Path:
    info = {"model": "unlearned", "method": "npo", "optimizer": opt, "attack": attack, "seed": seed, **extra}
    return _write(root, f"npo-{opt}-s{seed}-{attack}", info, metrics)


def _control(root: Path, model: str, attack: str | None, metrics: dict, **extra) -> Path:
    info = {"model": model, **BASE, "attack": attack, **extra}
    return _write(root, model if attack is None else f"{model}-{attack}", info, metrics)


def _summary(dirs: list[Path], names: list[str], controls: tuple[str, ...] = ()) -> dict:
    records = attach_attack_info(collect_rows(dirs), dirs)
    return summarize(records, names, controls, KINDS)


def _row(summary: dict, attack: str, label: str) -> dict:
    (entry,) = [a for a in summary["attacks"] if a["attack"] == attack]
    return next(r for r in entry["rows"] if (r["optimizer"] or r["model"]) == label)


def _quantize_study(root: Path) -> list[Path]:
    """npo/adamw, seeds 0 and 1: forget_prob 0.25, 0.5 unattacked → 0.75, 1.0 after 4-bit."""
    dirs = []
    for seed, before, after, rel in ((0, 0.25, 0.75, 0.01), (1, 0.5, 1.0, 0.03)):
        wc = {"weight_change": {"rel_change": rel, "q4_code_change": 0.125}}
        dirs.append(_unlearned(root, "none", seed, {"forget_prob": before, "model_utility": 0.5}, **wc))
        stats = {"attack_kind": "quantize", "attack_stats": {"quant_rel_change": 0.12, "backend": "rtn"}}
        dirs.append(
            _unlearned(root, "quantize_4bit", seed, {"forget_prob": after, "model_utility": 0.5}, **stats)
        )
    dirs.append(_control(root, "target", None, {"forget_prob": 0.875, "model_utility": 0.75}))
    dirs.append(_control(root, "target", "quantize_4bit", {"forget_prob": 0.75, "model_utility": 0.5}))
    dirs.append(_control(root, "oracle", None, {"forget_prob": 0.125, "model_utility": 0.75}))
    dirs.append(_control(root, "oracle", "quantize_4bit", {"forget_prob": 0.25, "model_utility": 0.75}))
    return dirs


def test_change_is_per_seed_then_mean_and_sd(tmp_path: Path) -> None:
    """Seeds: before 0.25, 0.5 → after 0.75, 1.0. Before 0.375 ± 0.25/√2 = 0.1768, after 0.875 ±
    0.1768; the paired changes are 0.5 and 0.5 → Δ 0.5 ± 0 (differencing the means' spreads would
    say ± √2·0.1768 = 0.25). rel_change 0.01, 0.03 → 0.02 ± 0.01414, logged on the unattacked twin.
    Cells: means to 3 significant digits, sds to 2."""
    s = _summary(_quantize_study(tmp_path), ["none", "quantize_4bit"], ("quantize_4bit",))
    assert [a["attack"] for a in s["attacks"]] == ["quantize_4bit"]  # none is the baseline, no table
    assert s["baseline"] == "none" and s["note"] is None
    assert s["metrics"] == ["forget_prob", "model_utility"]
    row = _row(s, "quantize_4bit", "adamw")
    fp = row["metrics"]["forget_prob"]
    assert (row["n"], row["seeds"], row["before_source"]) == (2, [0, 1], ["unattacked"])
    assert fp["per_seed"] == [
        {"seed": 0, "before": 0.25, "after": 0.75, "change": 0.5},
        {"seed": 1, "before": 0.5, "after": 1.0, "change": 0.5},
    ]
    assert fp["before"] == pytest.approx({"mean": 0.375, "sd": 0.25 / math.sqrt(2)})
    assert fp["after"] == pytest.approx({"mean": 0.875, "sd": 0.25 / math.sqrt(2)})
    assert fp["change"] == {"mean": 0.5, "sd": 0.0}
    assert row["weight_change"]["rel_change"] == pytest.approx({"mean": 0.02, "sd": 0.02 / math.sqrt(2)})
    assert row["attack_stats"] == {"quant_rel_change": {"mean": 0.12, "sd": 0.0}}  # "rtn" dropped
    lines = markdown_lines(s)
    header = next(line for line in lines if line.startswith("| method"))
    assert header == "| method | optimizer | n | rel_change | q4_code_change | forget_prob | model_utility |"
    adamw = next(line for line in lines if line.startswith("| npo | adamw"))
    assert adamw == (
        "| npo | adamw | 2 | 0.02 ± 0.014 | 0.125 ± 0 | 0.375 ± 0.18 → 0.875 ± 0.18 (Δ +0.5 ± 0) "
        "| 0.5 ± 0 → 0.5 ± 0 (Δ +0 ± 0) |"
    )
    assert "Attack statistics (mean over its models): quant_rel_change 0.12." in lines


def test_controls_are_read_against_the_unattacked_base_models(tmp_path: Path) -> None:
    """target 0.875 → 0.75 under 4-bit (Δ −0.125), oracle 0.125 → 0.25 (Δ +0.125); n = 1, no sd,
    no weight change; listed after the unlearned rows, target first."""
    s = _summary(_quantize_study(tmp_path), ["none", "quantize_4bit"], ("quantize_4bit",))
    (entry,) = s["attacks"]
    assert [(r["model"], r["optimizer"]) for r in entry["rows"]] == [
        ("unlearned", "adamw"),
        ("target", None),
        ("oracle", None),
    ]
    target = _row(s, "quantize_4bit", "target")["metrics"]["forget_prob"]
    assert target["per_seed"] == [{"seed": None, "before": 0.875, "after": 0.75, "change": -0.125}]
    assert math.isnan(target["change"]["sd"])
    lines = markdown_lines(s)
    assert "| target (control) | – | 1 | – | – | 0.875 → 0.75 (Δ -0.125) | 0.75 → 0.5 (Δ -0.25) |" in lines
    assert "| oracle (control) | – | 1 | – | – | 0.125 → 0.25 (Δ +0.125) | 0.75 → 0.75 (Δ +0) |" in lines


def _relearn_study(root: Path) -> dict:
    """npo/adamw seeds 0, 1 under none and relearn (curves 0.1 → 0.4 and 0.3 → 0.6 at step 10, after
    0.5 and 0.7), and the target's relearn control (0.9 → 0.95)."""
    dirs = []
    for seed, (start, mid, end) in enumerate(((0.1, 0.4, 0.5), (0.3, 0.6, 0.7))):
        dirs.append(_unlearned(root, "none", seed, {"forget_prob": 0.03, "model_utility": 0.5}))
        curve = [
            {"step": 10, "forget_prob": mid, "forget_rouge": 0.5},
            {"step": 0, "forget_prob": start, "forget_rouge": 0.25},
        ]
        curve += [{"step": 20, "forget_prob": 0.8}] if seed == 1 else []  # seed 0 stopped at 10
        metrics = {"forget_prob": end, "forget_truth_ratio": 0.6, "model_utility": 0.25}
        dirs.append(_unlearned(root, "relearn", seed, metrics, curve=curve))
    dirs.append(_control(root, "target", None, {"forget_prob": 0.99}))
    target_curve = [{"step": 0, "forget_prob": 0.9}, {"step": 10, "forget_prob": 0.95}]
    dirs.append(_control(root, "target", "relearn", {"forget_prob": 0.95}, curve=target_curve))
    return _summary(dirs, ["none", "relearn"], ("relearn",))


def test_relearn_before_is_step_0_of_its_curve(tmp_path: Path) -> None:
    """The none item's forget_prob (0.03) is on every forget row; relearn's (0.5, 0.7) on the held-out
    part, whose step-0 values are 0.1 and 0.3: Δ = 0.4, 0.4 → 0.4 ± 0. forget_truth_ratio is not in
    the curve: after only. model_utility is not a forget metric: before from the none twin (0.5).
    Curve mean at step 10: (0.4 + 0.6)/2 = 0.5 ± 0.1414; step 20, which one seed lacks, is left out."""
    s = _relearn_study(tmp_path)
    row = _row(s, "relearn", "adamw")
    assert row["before_source"] == ["curve step 0"]
    assert [p["before"] for p in row["metrics"]["forget_prob"]["per_seed"]] == [0.1, 0.3]
    assert row["metrics"]["forget_prob"]["change"]["mean"] == pytest.approx(0.4)
    assert math.isnan(row["metrics"]["forget_truth_ratio"]["before"]["mean"])
    assert row["metrics"]["model_utility"]["change"]["mean"] == pytest.approx(-0.25)
    curve = row["curve"]["forget_prob"]
    assert curve["steps"] == [0, 10]
    assert curve["mean"] == pytest.approx([0.2, 0.5]) and curve["sd"] == pytest.approx([0.1414214] * 2)
    target = _row(s, "relearn", "target")["metrics"]["forget_prob"]["per_seed"]
    assert target == [{"seed": None, "before": 0.9, "after": 0.95, "change": pytest.approx(0.05)}]
    # forget_truth_ratio (after only: 0.6 ± 0) stays out of the markdown table, named as in summary.json.
    text = "\n".join(markdown_lines(s))
    assert "Also in summary.json (`robustness`): forget_truth_ratio." in text
    header = next(line for line in markdown_lines(s) if line.startswith("| method"))
    assert "forget_truth_ratio" not in header and "forget_prob" in header


def test_relearn_plot_draws_mean_and_sd_band(tmp_path: Path, monkeypatch) -> None:
    """forget_prob panel: adamw mean 0.2, 0.5 with band ± 0.1414 (sd of 0.1, 0.3 and of 0.4, 0.6); the
    forget_rouge panel (0.25, 0.5 in both seeds) has a band of width 0; the target control no band."""
    from matplotlib.axes import Axes

    bands: list[tuple] = []
    real = Axes.fill_between
    monkeypatch.setattr(
        Axes,
        "fill_between",
        lambda self, x, lo, hi, *a, **k: bands.append((list(x), lo, hi)) or real(self, x, lo, hi, *a, **k),
    )
    assert plot_relearn(_relearn_study(tmp_path), tmp_path / "relearn.png")
    assert (tmp_path / "relearn.png").read_bytes()[:8] == PNG_MAGIC
    sd = math.sqrt(0.02)
    assert bands == [
        ([0, 10], pytest.approx([0.2 - sd, 0.5 - sd]), pytest.approx([0.2 + sd, 0.5 + sd])),
        ([0, 10], [0.25, 0.5], [0.25, 0.5]),
    ]


def test_without_none_attack_a_note_and_after_only(tmp_path: Path) -> None:
    """attack.names = [quantize_4bit]: the none items on disk are not the baseline; one note line, the
    unlearned cells show after only, the controls keep their before (the plain target / oracle)."""
    dirs = _quantize_study(tmp_path)
    s = _summary(dirs, ["quantize_4bit"], ("quantize_4bit",))
    assert s["baseline"] is None
    lines = markdown_lines(s)
    notes = [line for line in lines if line.startswith("> ")]
    assert notes == [f"> {s['note']}"] and "No `none` attack in attack.names" in s["note"]
    adamw = next(line for line in lines if line.startswith("| npo | adamw")).split(" | ")
    assert adamw[5] == "0.875 ± 0.18"
    assert "| target (control) | – | 1 | – | – | 0.875 → 0.75 (Δ -0.125) |" in "\n".join(lines)


def _stats(before: float, after: float, sd: float = math.nan) -> dict:
    return {
        "before": {"mean": before, "sd": sd},
        "after": {"mean": after, "sd": sd},
        "change": {"mean": after - before, "sd": sd},
    }


@pytest.mark.parametrize(
    ("key", "stats", "text"),
    [
        ("forget_prob", _stats(0.5, 0.25), "0.5 → 0.25 (Δ -0.25)"),
        ("forget_prob", _stats(0.123456, 0.5, 0.012345), "0.123 ± 0.012 → 0.5 ± 0.012 (Δ +0.377 ± 0.012)"),
        ("forget_quality", _stats(1e-5, 2e-4), "1.00e-05 → 2.00e-04 (Δ +1.90e-04)"),  # p-values: scientific
        ("forget_quality", _stats(1e-5, 0.5), "1.00e-05 → 0.5 (Δ +0.5)"),
        ("forget_prob", _stats(math.nan, 0.25), "0.25"),  # no before: after only
        ("forget_prob", _stats(0.5, math.nan), "–"),
    ],
)
def test_metric_cell(key: str, stats: dict, text: str) -> None:
    assert metric_cell(key, stats) == text


def test_no_attack_no_section(tmp_path: Path) -> None:
    dirs = [_unlearned(tmp_path, "none", 0, {"forget_prob": 0.1}), _control(tmp_path, "target", None, {})]
    s = _summary(dirs, ["none"])
    assert s["attacks"] == [] and markdown_lines(s) == []


def test_malformed_extras_are_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    d = _unlearned(
        tmp_path, "relearn", 0, {"forget_prob": 0.5}, curve=[{"forget_prob": 0.1}], weight_change=3
    )
    with caplog.at_level(logging.WARNING):
        info = read_attack_info(d / "info.json")
    assert info == {"attack_kind": None, "attack_stats": {}, "curve": None, "weight_change": {}}
    assert "curve is not a list" in caplog.text and "weight_change is not a mapping" in caplog.text


def test_quantize_plot_bars_are_the_table_values(tmp_path: Path, monkeypatch) -> None:
    """One method, one metric in the rows: bars unattacked / quantize_4bit at adamw (0.375, 0.875),
    target (0.875, 0.75) and oracle (0.125, 0.25); error bars only where there is an sd (adamw)."""
    from matplotlib.axes import Axes

    bars: list[tuple] = []
    real = Axes.bar
    monkeypatch.setattr(
        Axes,
        "bar",
        lambda self, x, h, *a, **k: bars.append((k["label"], list(h))) or real(self, x, h, *a, **k),
    )
    s = _summary(_quantize_study(tmp_path), ["none", "quantize_4bit"], ("quantize_4bit",))
    path = tmp_path / "robustness-quantize.png"
    assert plot_quantize(s, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert bars == [
        ("unattacked", [pytest.approx(0.375), 0.875, 0.125]),
        ("quantize_4bit", [pytest.approx(0.875), 0.75, 0.25]),
    ]
    assert not plot_relearn(s, tmp_path / "relearn.png")  # no relearn attack: nothing written
    assert not (tmp_path / "relearn.png").exists()


def test_plots_written_only_when_their_data_exist(tmp_path: Path) -> None:
    curve = [{"step": 0, "forget_prob": 0.1, "forget_rouge": 0.2}, {"step": 5, "forget_prob": 0.4}]
    dirs = [
        _unlearned(tmp_path, "none", 0, {"forget_prob": 0.1}),
        _unlearned(tmp_path, "relearn", 0, {"forget_prob": 0.4}, curve=curve),
        _unlearned(tmp_path, "noise", 0, {"forget_prob": 0.2}),
        _control(tmp_path, "oracle", "relearn", {"forget_prob": 0.1}, curve=curve),
    ]
    s = _summary(dirs, ["none", "relearn", "noise"], ("relearn",))
    assert plot_relearn(s, tmp_path / "relearn.png")
    data = (tmp_path / "relearn.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not plot_quantize(s, tmp_path / "q.png") and not (tmp_path / "q.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "relearn.png"]  # no temp files


def test_report_stage_writes_robustness_with_controls(tmp_path: Path) -> None:
    """The stage reads target-/oracle-<attack> for attack.controls: they fill the robustness table
    and summary.json's controls, and are listed among every run, not as main-table rows."""
    _quantize_study(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["unlearn"].update(pairs=[{"method": "npo", "optimizer": "adamw"}], seeds=[0, 1])
    params["attack"] = {
        "names": ["none", "quantize_4bit"],
        "controls": ["quantize_4bit"],
        "quantize_4bit": {"kind": "quantize", "backend": "rtn", "bits": 4},
    }
    run_report_stage(tmp_path, params)
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert [(r["model"], r["attack"]) for r in summary["controls"]] == [
        ("target", "quantize_4bit"),
        ("oracle", "quantize_4bit"),
    ]
    assert [(g["model"], g["attack"]) for g in summary["groups"]][:2] == [("target", None), ("oracle", None)]
    (attack,) = summary["robustness"]["attacks"]
    assert [r["model"] for r in attack["rows"]] == ["unlearned", "target", "oracle"]
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "## Robustness to attacks" in text and "### quantize_4bit (quantize)" in text
    assert "![robustness-quantize](robustness-quantize.png)" in text
    assert "| target | – | – | quantize_4bit | – | – | " in text  # among every run
    assert (tmp_path / "reports" / "robustness-quantize.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "reports" / "relearn.png").exists()
    # The DVC metrics: the headline per group, metric first, the unattacked group without a suffix.
    headline = json.loads((tmp_path / "metrics.json").read_text())
    groups = ["npo-adamw", "npo-adamw-quantize_4bit", "oracle", "oracle-quantize_4bit", "target"]
    assert sorted(headline["forget_prob"]) == [*groups, "target-quantize_4bit"]
    npo = next(g for g in summary["groups"] if g["method"] == "npo" and g["attack"] == "none")
    assert headline["forget_prob"]["npo-adamw"] == pytest.approx(npo["mean"]["forget_prob"])
