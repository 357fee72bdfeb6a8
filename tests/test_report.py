"""report and spread: row order and keys, malformed inputs, grouping over seeds (mean ± sd, log10
forget quality), which rows their spreads separate, health flags, summary shape, markdown, trade-off PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, eval_dir, load_stage
from typer.testing import CliRunner

from unlearnflow.errors import UnlearnflowError
from unlearnflow.io import write_json
from unlearnflow.report import (
    collect_rows,
    format_mean_sd,
    format_value,
    write_markdown,
    write_summary,
)
from unlearnflow.report_plot import plot_tradeoff
from unlearnflow.spread import P_FLOOR, compare_groups, group_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NONE = {"method": None, "optimizer": None, "attack": None, "seed": None}


def _eval_dir(root: Path, name: str, info: dict, metrics: dict) -> Path:
    d = eval_dir(root, name)
    write_json(d / "info.json", info)
    write_json(d / "metrics.json", metrics)
    return d


def _unlearned(method: str, attack: str | None, seed: int | None = None) -> dict:
    return {"model": "unlearned", "method": method, "optimizer": "adamw", "attack": attack, "seed": seed}


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
    return [
        _eval_dir(tmp_path, "npo-adamw-relearn", _unlearned("npo", "relearn"), _metrics(0.0, 0.41, 0.2)),
        _eval_dir(tmp_path, "oracle", {"model": "oracle", **NONE}, _metrics(1.0, 0.62, 0.1)),
        _eval_dir(tmp_path, "npo-adamw", _unlearned("npo", None), _metrics(0.000123456, 0.5, 0.123456789)),
        _eval_dir(tmp_path, "target", {"model": "target", **NONE}, _metrics(1.5e-12, 0.63, 0.99)),
    ]


def _seeded(tmp_path: Path, method: str, values: dict[str, list[float]], flags=None) -> tuple[list, list]:
    """Eval dirs of one method over seeds 0, 1, … with the given per-seed metric values, and the
    unlearn items' health.json paths (``flags[seed]``: the flags written; absent key = no file)."""
    dirs, health = [], []
    for seed in range(len(next(iter(values.values())))):
        metrics = {k: v[seed] for k, v in values.items()}
        dirs.append(
            _eval_dir(tmp_path, f"{method}-adamw-s{seed}-none", _unlearned(method, "none", seed), metrics)
        )
        path = tmp_path / "unlearned" / f"{method}-adamw-s{seed}" / "health.json"
        if flags is not None and seed in flags:
            write_json(path, {"flags": flags[seed]})
        health.append(path)
    return dirs, health


def test_collect_rows_order_and_keys(eval_dirs: list[Path]) -> None:
    rows = collect_rows(eval_dirs)
    assert [(r["model"], r["attack"]) for r in rows] == [
        ("target", None),
        ("oracle", None),
        ("unlearned", None),  # no attack sorts before "relearn"
        ("unlearned", "relearn"),
    ]
    assert list(rows[0])[:6] == ["model", "method", "optimizer", "attack", "seed", "health"]
    assert rows[0]["method"] is None and rows[2]["method"] == "npo"
    assert set(rows[3]) == {"model", "method", "optimizer", "attack", "seed", "health", *_metrics(0, 0, 0)}
    assert math.isnan(rows[0]["world_facts_rouge"])


def test_seeds_sort_within_their_row(tmp_path: Path) -> None:
    dirs = [
        _eval_dir(tmp_path, f"ga-s{s}", _unlearned("ga", "none", s), _metrics(0.5, 0.5, 0.5))
        for s in (2, 0, 1)
    ]
    assert [r["seed"] for r in collect_rows(dirs)] == [0, 1, 2]


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


GOOD_INFO = json.dumps(_unlearned("npo", "none", 0))
GOOD_METRICS = json.dumps({"forget_quality": 0.5})


@pytest.mark.parametrize(
    ("file", "text", "expected"),
    [
        ("metrics.json", '{"forget_quality": 0.5,', "not valid JSON"),
        ("metrics.json", "[0.5, 0.6]", "flat mapping of metric name → number, got list"),
        ("metrics.json", '{"forget": {"prob": 0.5}}', "'forget' is {'prob': 0.5}"),
        ("metrics.json", '{"forget_prob": "0.5"}', "'forget_prob' is '0.5'"),
        ("metrics.json", '{"forget_prob": null}', "'forget_prob' is None"),
        ("metrics.json", '{"forget_prob": true}', "'forget_prob' is True"),
        ("metrics.json", '{"seed": 1}', "reserved keys ['seed']"),
        ("info.json", "unlearned", "not valid JSON"),
        ("info.json", '["unlearned"]', "expected a mapping, got list"),
        ("info.json", '{"model": "student"}', "model must be one of"),
        ("info.json", '{"model": "unlearned", "method": 3}', "method must be a string or null, got 3"),
        ("info.json", '{"model": "unlearned", "seed": "1"}', "seed must be an integer or null, got '1'"),
        ("info.json", '{"model": "unlearned", "seed": 1.5}', "seed must be an integer or null, got 1.5"),
        ("health.json", '{"flags": "diverged"}', 'expected {"flags": [strings]}'),
        ("health.json", '{"flags": [1]}', 'expected {"flags": [strings]}'),
        ("health.json", "{flags: []}", "not valid JSON"),
    ],
)
def test_malformed_input_is_one_line_naming_the_file(
    tmp_path: Path, file: str, text: str, expected: str
) -> None:
    d = eval_dir(tmp_path, "npo-adamw-s0-none")
    d.mkdir(parents=True)
    health = tmp_path / "unlearned" / "npo-adamw-s0" / "health.json"
    health.parent.mkdir(parents=True)
    files = {"info.json": d / "info.json", "metrics.json": d / "metrics.json", "health.json": health}
    files["info.json"].write_text(GOOD_INFO)
    files["metrics.json"].write_text(GOOD_METRICS)
    files["health.json"].write_text('{"flags": []}')
    collect_rows([d], [health])  # the good files pass
    files[file].write_text(text)
    with pytest.raises(UnlearnflowError) as err:
        collect_rows([d], [health])
    msg = str(err.value)
    assert msg.startswith(f"{files[file]}: ") and expected in msg and "\n" not in msg, msg


def _params(tmp_path: Path, seeds: list[int]) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["unlearn"].update(pairs=[{"method": "npo", "optimizer": "adamw"}], seeds=seeds)
    params["attack"]["names"] = ["none"]
    params["attack"]["controls"] = []
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_exits_2_with_one_line_on_a_malformed_metrics_file(tmp_path: Path) -> None:
    for name, info in (("target", {"model": "target", **NONE}), ("oracle", {"model": "oracle", **NONE})):
        _eval_dir(tmp_path, name, info, {"forget_quality": 0.5})
    bad = _eval_dir(tmp_path, "npo-adamw-s0-none", _unlearned("npo", "none", 0), {})
    (bad / "metrics.json").write_text("{not json")
    args = ["--evals", str(tmp_path / "eval"), "--unlearned", str(tmp_path / "unlearned")]
    args += ["--out", str(tmp_path / "reports"), "--params", str(_params(tmp_path, [0]))]
    result = CliRunner().invoke(load_stage("report").app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad / 'metrics.json'}: not valid JSON"), lines
    assert not (tmp_path / "reports").exists()


def test_group_mean_and_sample_sd_on_hand_values(tmp_path: Path) -> None:
    """Three seeds: model_utility 0.4, 0.5, 0.6 → mean 0.5, sd √((0.1² + 0 + 0.1²)/(3 − 1)) = 0.1.
    forget_quality 1e-2, 1e-3, 1e-4 → arithmetic mean 0.0037, sd √((0.0063² + 0.0027² + 0.0036²)/2)
    = √(5.994e-5/2) = 5.4745e-3; log10 −2, −3, −4 → mean −3, sd 1. forget_prob lacks seed 2 → NaN
    (no mean over a subset). The oracle is one model: n 1, sd NaN."""
    dirs, _ = _seeded(
        tmp_path, "ga", {"model_utility": [0.4, 0.5, 0.6], "forget_quality": [1e-2, 1e-3, 1e-4]}
    )
    write_json(dirs[0] / "metrics.json", {"model_utility": 0.4, "forget_quality": 1e-2, "forget_prob": 0.3})
    oracle = _eval_dir(tmp_path, "oracle", {"model": "oracle", **NONE}, {"model_utility": 0.7})
    oracle_g, ga = group_rows(collect_rows([*dirs, oracle]))
    assert (ga["method"], ga["attack"], ga["n"], ga["seeds"]) == ("ga", "none", 3, [0, 1, 2])
    assert ga["mean"]["model_utility"] == pytest.approx(0.5)
    assert ga["sd"]["model_utility"] == pytest.approx(0.1)
    assert ga["mean"]["forget_quality"] == pytest.approx(0.0037)
    assert ga["sd"]["forget_quality"] == pytest.approx(5.4745e-3, rel=1e-4)
    assert ga["log10_mean"]["forget_quality"] == pytest.approx(-3.0)
    assert ga["log10_sd"]["forget_quality"] == pytest.approx(1.0)
    assert math.isnan(ga["mean"]["forget_prob"]) and math.isnan(ga["sd"]["forget_prob"])
    assert (oracle_g["model"], oracle_g["n"], oracle_g["mean"]["model_utility"]) == ("oracle", 1, 0.7)
    assert math.isnan(oracle_g["sd"]["model_utility"])


def test_forget_quality_of_zero_is_floored_on_log10(tmp_path: Path) -> None:
    """p = 0 is an underflow: log10 takes P_FLOOR = 2.2251e-308 → −307.65; with 1e-3 the log10 mean is
    (−307.65 − 3)/2 = −155.33 and the group counts one zero."""
    dirs, _ = _seeded(tmp_path, "ga", {"forget_quality": [0.0, 1e-3]})
    (g,) = group_rows(collect_rows(dirs))
    assert math.log10(P_FLOOR) == pytest.approx(-307.6527, abs=1e-4)
    assert g["log10_mean"]["forget_quality"] == pytest.approx((math.log10(P_FLOOR) - 3) / 2)
    assert g["zeros"]["forget_quality"] == 1


def test_spread_overlap_on_hand_cases(tmp_path: Path) -> None:
    """model_utility: A = 0.5, 0.6, 0.7 → 0.6 ± 0.1 = [0.5, 0.7]; B = 0.55, 0.65, 0.75 → [0.55, 0.75]
    overlaps A; C = 0.1, 0.2, 0.3 → [0.1, 0.3] is separated from A and B (0.3 < 0.5), both higher;
    D = 0.65, 0.8, 0.95 → 0.8 ± 0.15 = [0.65, 0.95] overlaps A on [0.65, 0.7] though neither mean lies
    in the other's interval (the intervals overlap, not the means).
    forget_quality on log10: A = 1e-2, 1e-3, 1e-4 → [−4, −2]; C = 1e-6, 1e-7, 1e-8 → [−8, −6]:
    separated, although on the linear scale A's 0.0037 ± 0.0055 would contain C's 3.7e-7. B equals A
    there: overlap. target and oracle (n = 1 each) have no spread to compare."""
    fq_a, fq_c = [1e-2, 1e-3, 1e-4], [1e-6, 1e-7, 1e-8]
    a, _ = _seeded(tmp_path, "a", {"model_utility": [0.5, 0.6, 0.7], "forget_quality": fq_a})
    b, _ = _seeded(tmp_path, "b", {"model_utility": [0.55, 0.65, 0.75], "forget_quality": fq_a})
    c, _ = _seeded(tmp_path, "c", {"model_utility": [0.1, 0.2, 0.3], "forget_quality": fq_c})
    d, _ = _seeded(tmp_path, "d", {"model_utility": [0.65, 0.8, 0.95], "forget_quality": fq_a})
    base = [
        _eval_dir(tmp_path, k, {"model": k, **NONE}, {"model_utility": 0.6, "forget_quality": 1.0})
        for k in ("target", "oracle")
    ]
    comparisons = compare_groups(group_rows(collect_rows([*base, *a, *b, *c, *d])))
    status = {(c["metric"], c["a"], c["b"]): (c["status"], c["higher"]) for c in comparisons}
    label = {k: f"{k}/adamw/none" for k in "abcd"}
    assert status["model_utility", label["a"], label["b"]] == ("overlap", None)
    assert status["model_utility", label["a"], label["c"]] == ("separated", label["a"])
    assert status["model_utility", label["b"], label["c"]] == ("separated", label["b"])
    assert status["model_utility", label["a"], label["d"]] == ("overlap", None)
    assert status["model_utility", label["c"], label["d"]] == ("separated", label["d"])
    assert status["forget_quality", label["a"], label["c"]] == ("separated", label["a"])
    assert status["forget_quality", label["a"], label["b"]] == ("overlap", None)
    assert status["model_utility", "target", "oracle"] == ("no spread", None)
    # The oracle's point 0.6 lies inside A's [0.5, 0.7] and outside C's [0.1, 0.3].
    assert status["model_utility", "oracle", label["a"]] == ("overlap", None)
    assert status["model_utility", "oracle", label["c"]] == ("separated", "oracle")
    key = ("forget_quality", label["a"], label["c"])
    a_vs_c = next(x for x in comparisons if (x["metric"], x["a"], x["b"]) == key)
    assert a_vs_c["scale"] == "log10" and a_vs_c["a_interval"] == pytest.approx([-4, -2])
    assert {x["metric"] for x in comparisons} == {"model_utility", "forget_quality"}  # only metrics present


def test_health_flags_are_shown_loudly(tmp_path: Path) -> None:
    """ga's seed 1 is flagged (a warning line at the top, ⚠ s1 in its row, its run's cell); gd's seeds
    are healthy but seed 1 has no health.json (an adopted model): fine, said as 2 of 3 recorded;
    a row without any health.json shows –."""
    ga, ga_h = _seeded(
        tmp_path, "ga", {"model_utility": [0.5] * 3}, {0: [], 1: ["diverged: loss 9e6"], 2: []}
    )
    gd, gd_h = _seeded(tmp_path, "gd", {"model_utility": [0.6] * 3}, {0: [], 2: []})
    nh, nh_h = _seeded(tmp_path, "nh", {"model_utility": [0.7] * 2}, {})
    rows = collect_rows([*ga, *gd, *nh], [*ga_h, *gd_h, *nh_h])
    groups = group_rows(rows)
    assert [g["flagged_seeds"] for g in groups] == [[1], [], []]
    assert groups[0]["health_flags"] == ["s1: diverged: loss 9e6"]
    path = tmp_path / "report.md"
    write_markdown(rows, groups, compare_groups(groups), path)
    lines = path.read_text().splitlines()
    assert lines[2].startswith("> **⚠ 1 unlearn run(s) flagged unhealthy**")
    assert lines[3] == "> - `ga-adamw-s1`: diverged: loss 9e6"

    def health_cell(method: str, n: int) -> str:
        (line,) = [x for x in lines if x.startswith(f"| unlearned | {method} | adamw | none | {n} | ")]
        return line.split(" | ")[5]

    assert health_cell("ga", 3) == "⚠ s1"
    assert health_cell("gd", 3) == "ok (2 of 3 recorded)"
    assert health_cell("nh", 2) == "–"
    run = next(line for line in lines if line.startswith("| unlearned | ga | adamw | none | 1 |"))
    assert "⚠ diverged: loss 9e6" in run


def test_no_warning_when_healthy(tmp_path: Path) -> None:
    dirs, health = _seeded(tmp_path, "ga", {"model_utility": [0.5, 0.6]}, {0: [], 1: []})
    rows = collect_rows(dirs, health)
    path = tmp_path / "report.md"
    write_markdown(rows, group_rows(rows), [], path)
    text = path.read_text()
    assert "flagged unhealthy" not in text
    assert "| unlearned | ga | adamw | none | 2 | ok | " in text  # the row of both seeds
    assert "| unlearned | ga | adamw | none | 1 | ok | " in text  # seed 1's run


def test_summary_shape_and_round_trip(eval_dirs: list[Path], tmp_path: Path) -> None:
    rows = collect_rows(eval_dirs)
    groups = group_rows(rows)
    comparisons = compare_groups(groups)
    path = tmp_path / "reports" / "summary.json"
    write_summary(rows, groups, comparisons, path)
    back = json.loads(path.read_text())
    assert set(back) == {"runs", "groups", "comparisons"}
    assert [r["model"] for r in back["runs"]] == ["target", "oracle", "unlearned", "unlearned"]
    for got, want in zip(back["runs"], rows, strict=True):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert (isinstance(v, float) and math.isnan(v) and math.isnan(got[k])) or got[k] == v
    assert [g["n"] for g in back["groups"]] == [1, 1, 1, 1]
    assert back["groups"][2]["mean"]["model_utility"] == 0.5
    assert len(back["comparisons"]) == len(comparisons) > 0


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


@pytest.mark.parametrize(
    ("key", "mean", "sd", "text"),
    [
        ("model_utility", 0.5, 0.1414213, "0.5 ± 0.1414"),
        ("model_utility", 0.5, float("nan"), "0.5"),  # n = 1: no spread to show
        ("forget_quality", 1e-4, 2e-5, "1.000e-04 ± 2.000e-05"),
        ("forget_quality", 0.98, 0.0, "0.98 ± 0"),  # identical seeds, not "0.000e+00"
    ],
)
def test_format_mean_sd(key: str, mean: float, sd: float, text: str) -> None:
    assert format_mean_sd(key, mean, sd) == text


def test_markdown_table(tmp_path: Path) -> None:
    """Main table: one row per method × optimizer × attack with n and mean ± sd (0.4, 0.6 → 0.5 ±
    0.1414); forget_quality 1e-4, 1e-2 → mean 0.00505 ± 0.0099/√2 = 0.007, log10 −3 ± 1.414; target as is."""
    target = _eval_dir(tmp_path, "target", {"model": "target", **NONE}, _metrics(1.5e-12, 0.63, 0.99))
    dirs, _ = _seeded(
        tmp_path,
        "npo",
        {"forget_quality": [1e-4, 1e-2], "model_utility": [0.4, 0.6], "world_facts_rouge": [math.nan] * 2},
    )
    rows = collect_rows([target, *dirs])
    groups = group_rows(rows)
    path = tmp_path / "reports" / "report.md"
    write_markdown(rows, groups, compare_groups(groups), path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert any("forget_quality" in line and "KS" in line for line in lines)  # legend
    assert any("sample standard deviation" in line for line in lines)
    header = next(line for line in lines if line.startswith("| model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:10] == [
        "model",
        "method",
        "optimizer",
        "attack",
        "n",
        "health",
        "forget_quality",
        "log10 forget_quality",
        "model_utility",
        "forget_prob",
    ]
    body = [line for line in lines if line.startswith(("| target", "| unlearned"))]
    assert body[0].startswith("| target | – | – | – | 1 | – | 1.500e-12 | -11.82 | 0.63 | 0.99 |")
    assert body[1].startswith(
        "| unlearned | npo | adamw | none | 2 | – | 0.00505 ± 0.007 | -3 ± 1.414 | 0.5 ± 0.1414 | – |"
    )
    assert "## Which differences hold across seeds" in lines
    assert "## Every run" in lines
    assert (
        sum(line.startswith("| unlearned | npo | adamw | none | ") for line in lines) == 3
    )  # 1 group + 2 runs


def test_tradeoff_png(eval_dirs: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "reports" / "tradeoff.png"
    plot_tradeoff(group_rows(collect_rows(eval_dirs)), path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["tradeoff.png"]  # no temp file left behind


def test_tradeoff_draws_error_bars_over_seeds(tmp_path: Path, monkeypatch) -> None:
    """mu 0.4, 0.6 → x 0.5 ± 0.1414; fq 1e-4, 1e-2 → geometric mean 1e-3, log10 sd √2 → bars down to
    10^(−3 − √2) and up to 10^(−3 + √2). The single oracle gets none."""
    from matplotlib.axes import Axes

    calls: list[tuple] = []
    real = Axes.errorbar
    monkeypatch.setattr(
        Axes, "errorbar", lambda self, x, y, *a, **k: calls.append((x, y, k)) or real(self, x, y, *a, **k)
    )
    dirs, _ = _seeded(tmp_path, "npo", {"forget_quality": [1e-4, 1e-2], "model_utility": [0.4, 0.6]})
    oracle = _eval_dir(tmp_path, "oracle", {"model": "oracle", **NONE}, _metrics(1.0, 0.62, 0.1))
    plot_tradeoff(group_rows(collect_rows([oracle, *dirs])), tmp_path / "tradeoff.png")
    ((x, y, kw),) = calls
    assert x == [pytest.approx(0.5)] and y == [pytest.approx(1e-3)]
    assert kw["xerr"] == pytest.approx(math.sqrt(0.02))
    (low,), (high,) = kw["yerr"]
    assert 1e-3 - low == pytest.approx(10 ** (-3 - math.sqrt(2)))
    assert 1e-3 + high == pytest.approx(10 ** (-3 + math.sqrt(2)))


def test_tradeoff_falls_back_to_privleak_without_forget_quality(tmp_path: Path, monkeypatch) -> None:
    """MUSE-like rows (no forget_quality) are plotted on privleak; the y label says so."""
    from matplotlib.axes import Axes

    labels: list[str] = []
    real = Axes.set_ylabel
    monkeypatch.setattr(
        Axes, "set_ylabel", lambda self, text, *a, **k: labels.append(text) or real(self, text)
    )
    rows = [
        {"model": "target", **NONE, "health": None, "model_utility": 0.6, "privleak": -98.0},
        {"model": "oracle", **NONE, "health": None, "model_utility": 0.62, "privleak": 0.0},
        {**_unlearned("npo", None, 0), "health": None, "model_utility": 0.5, "privleak": -20.0},
    ]
    path = tmp_path / "tradeoff.png"
    plot_tradeoff(group_rows(rows), path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert labels == ["privleak (0 = oracle, −100 = forget set recognised)"]


# --- data without a truth-ratio oracle (issue 12: custom QA, no paraphrases, no holdout) -------------

FACTS = {"facts_total": 20.0, "facts_refused": 0.0, "facts_degenerate": 14.0, "facts_wrong": 0.0}


def _custom_rows() -> list[dict]:
    """What evaluate writes for a user's own forget set: model_utility, forget prob / ROUGE and the
    per-fact counts; no forget_quality, privleak or mia_* (no truth ratios, no holdout)."""

    def row(ids: dict, mu: float, prob: float, rouge: float, leaked: float) -> dict:
        facts = {**FACTS, "facts_leaked": leaked, "facts_leak_rate": leaked / 20}
        return {
            **ids,
            "health": None,
            "model_utility": mu,
            "forget_prob": prob,
            "forget_rouge": rouge,
            **facts,
        }

    return [
        row({"model": "target", **NONE}, 0.6, 0.92, 0.95, 20.0),
        row({"model": "oracle", **NONE}, 0.61, 0.1, 0.2, 0.0),
        row({**_unlearned("ga", "none", 0)}, 0.4, 0.36, 0.3, 6.0),
        row({**_unlearned("ga", "none", 1)}, 0.5, 0.40, 0.4, 4.0),
    ]


def _capture(monkeypatch, method: str) -> list:
    """Record the positional arguments of every ``Axes.<method>`` call (the call still runs)."""
    from matplotlib.axes import Axes

    seen: list = []
    real = getattr(Axes, method)
    monkeypatch.setattr(Axes, method, lambda self, *a, **k: seen.append(a) or real(self, *a, **k))
    return seen


def test_tradeoff_without_forget_quality_plots_what_exists(tmp_path: Path, monkeypatch) -> None:
    """Custom data: one panel each for forget_prob, forget_rouge and facts_leaked against
    model_utility (no empty forget_quality chart); ga's point is its seeds' mean: x (0.4 + 0.5)/2 =
    0.45, and on the last panel y (6 + 4)/2 = 5 facts leaked."""
    labels = _capture(monkeypatch, "set_ylabel")
    points = _capture(monkeypatch, "scatter")
    path = tmp_path / "tradeoff.png"
    panels = plot_tradeoff(group_rows(_custom_rows()), path)
    assert panels == ["forget_prob", "forget_rouge", "facts_leaked"]
    assert [label.split(":")[0] for (label,) in labels] == panels
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert len(points) == 3 * 3  # target, oracle and ga on each panel, in that order
    x, y = points[-1]
    assert x == [pytest.approx(0.45)] and y == [pytest.approx(5.0)]


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        (
            [{"model": "target", **NONE, "health": None, "forget_prob": 0.9}],
            "nothing to plot: no model has model_utility",
        ),
        (
            [{"model": "target", **NONE, "health": None, "model_utility": 0.6, "retain_prob": 0.9}],
            "nothing to plot: no model has any of forget_quality, privleak, forget_prob, forget_rouge, "
            "facts_leaked",
        ),
        (
            [
                {"model": "target", **NONE, "health": None, "model_utility": 0.6},
                {"model": "oracle", **NONE, "health": None, "forget_prob": 0.1},
            ],
            "nothing to plot: no model has model_utility together with forget_prob",
        ),
    ],
)
def test_tradeoff_with_nothing_to_plot_says_why(
    tmp_path: Path, monkeypatch, caplog, rows: list[dict], reason: str
) -> None:
    """Nothing to plot: still a PNG (dvc.yaml declares it a plot; DVC reports a missing one as an
    error), with the reason drawn in it and logged once, naming exactly what is missing."""
    texts = _capture(monkeypatch, "text")
    path = tmp_path / "tradeoff.png"
    with caplog.at_level("WARNING", logger="unlearnflow.report"):
        assert plot_tradeoff(group_rows(rows), path) == []
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [args[2] for args in texts] == [reason]  # text(x, y, s)
    assert [r.getMessage() for r in caplog.records] == [f"tradeoff.png: {reason}"]


def test_tradeoff_warnings_name_exactly_what_is_missing(tmp_path: Path, caplog) -> None:
    """TOFU-like rows where the target lacks forget_quality (but has model_utility): the warning names
    forget_quality only. Custom rows: a model without forget_rouge is left out of that panel alone; one
    without model_utility out of the plot."""
    rows = [
        {"model": "target", **NONE, "health": None, "model_utility": 0.6},
        {"model": "oracle", **NONE, "health": None, "model_utility": 0.62, "forget_quality": 1.0},
    ]
    with caplog.at_level("WARNING", logger="unlearnflow.report"):
        plot_tradeoff(group_rows(rows), tmp_path / "a.png")
    assert [r.getMessage() for r in caplog.records] == ["target: no forget_quality; not plotted"]

    custom = _custom_rows()
    del custom[0]["forget_rouge"]
    del custom[1]["model_utility"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="unlearnflow.report"):
        plot_tradeoff(group_rows(custom), tmp_path / "b.png")
    assert [r.getMessage() for r in caplog.records] == [
        "target: no forget_rouge; not plotted on the forget_rouge panel",
        "oracle: no model_utility; not plotted",
    ]


def test_report_header_explains_only_the_columns_shown(tmp_path: Path) -> None:
    """Custom data: the legend explains model_utility and facts_leaked, and nothing in report.md
    mentions forget_quality, privleak or mia_* (not in the table). A benchmark with them explains them."""
    rows = _custom_rows()
    groups = group_rows(rows)
    path = tmp_path / "report.md"
    write_markdown(rows, groups, compare_groups(groups), path)
    text = path.read_text()
    assert "**model_utility**" in text and "**facts_leaked**" in text
    for absent in ("forget_quality", "privleak", "mia_"):
        assert absent not in text, absent
    assert "**mean ± sd**" in text and "docs/metrics.md" in text  # the entries that hold for any table

    tofu = [{**r, "forget_quality": 0.5, "privleak": -20.0, "mia_min_k": 0.6} for r in rows]
    groups = group_rows(tofu)
    write_markdown(tofu, groups, compare_groups(groups), path)
    text = path.read_text()
    assert "**forget_quality**" in text and "**privleak**" in text and "`mia_*`" in text
    assert "forget_quality is compared on log10" in text


def test_report_tables_show_only_facts_leaked_but_summary_keeps_every_count(tmp_path: Path) -> None:
    """Of the six facts_* counts, report.md's tables show facts_leaked, right after the lead metrics
    (ga: 6 and 4 leaked over its two seeds → 5 ± 1.414); summary.json keeps all six."""
    rows = _custom_rows()
    groups = group_rows(rows)
    write_markdown(rows, groups, compare_groups(groups), tmp_path / "report.md")
    lines = (tmp_path / "report.md").read_text().splitlines()
    headers = [
        [c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| model |")
    ]
    assert len(headers) == 2  # the main table and every run
    for header in headers:
        assert [c for c in header if c.startswith("facts_")] == ["facts_leaked"]
    assert headers[0][6:9] == ["model_utility", "facts_leaked", "forget_prob"]
    ga = next(line for line in lines if line.startswith("| unlearned | ga | adamw | none | 2 |"))
    assert ga.split(" | ")[7] == "5 ± 1.414"
    write_summary(rows, groups, [], tmp_path / "summary.json")
    run = json.loads((tmp_path / "summary.json").read_text())["runs"][0]
    assert {k for k in run if k.startswith("facts_")} == {*FACTS, "facts_leaked", "facts_leak_rate"}
