"""Benchmark loaders (TOFU, MUSE, WMDP, custom) and the record reader under them.

Every fixture is a handful of rows written into ``tmp_path`` in each format a user may have
(JSON list, JSONL, ``save_to_disk`` directories); the hub path is exercised by replacing
``datasets.load_dataset`` with a fake that serves the same rows, so nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from unlearnflow.config import BenchmarkConfig
from unlearnflow.data import custom, muse, tofu, wmdp
from unlearnflow.data.benchmark import Benchmark
from unlearnflow.data.sources import (
    RecordsNotFound,
    is_local,
    normalize_qa,
    parse_ref,
    qa_rows,
    read_file,
    read_optional,
    read_records,
)
from unlearnflow.errors import UnlearnflowError

Rows = list[dict[str, Any]]


# --- helpers -------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_dataset(path: Path, rows: Rows, split: str | None = None) -> Path:
    """``Dataset.save_to_disk``, or a one-split ``DatasetDict`` when ``split`` is given."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return path


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def check_serialisable(bench: Benchmark) -> None:
    """Every split survives JSON (what ``prepare`` writes) and the manifest part is JSON too."""
    for name, rows in bench.splits.items():
        assert json.loads(json.dumps(rows)) == rows, name
        assert re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", name), name  # a split is a file name
    json.dumps(bench.to_manifest())
    json.dumps(bench.meta)
    bench.validate()


def layout(bench: Benchmark) -> dict[str, tuple[str, str, int]]:
    return {n: (i.kind, i.role, len(bench.splits[n])) for n, i in bench.info.items()}


# --- TOFU fixtures -----------------------------------------------------------------------------------


def tofu_rows(prefix: str, n: int, *, perturbed: bool = False, n_pert: int = 5) -> Rows:
    rows: Rows = []
    for i in range(n):
        row: dict[str, Any] = {"question": f"{prefix} question {i}?", "answer": f"{prefix} answer {i}."}
        if perturbed:
            row["paraphrased_question"] = f"{prefix} rephrased question {i}?"
            row["paraphrased_answer"] = f"{prefix} paraphrase {i}."
            row["perturbed_answer"] = [f"{prefix} wrong {i}.{k}" for k in range(n_pert)]
        rows.append(row)
    return rows


def tofu_configs(*, perturbed: bool = True, holdout: bool = True, utility: bool = True) -> dict[str, Rows]:
    """A miniature TOFU: 10 "authors" of one QA each; forget10 is the last one."""
    configs: dict[str, Rows] = {
        "forget10": tofu_rows("forget", 2),
        "retain90": tofu_rows("retain", 8),
        "retain_perturbed": tofu_rows("retain", 3, perturbed=True),
    }
    if perturbed:
        configs["forget10_perturbed"] = tofu_rows("forget", 2, perturbed=True)
    if holdout:
        configs["holdout10"] = tofu_rows("holdout", 2)
    if utility:
        configs["real_authors_perturbed"] = tofu_rows("real", 3, perturbed=True, n_pert=3)
        configs["world_facts_perturbed"] = tofu_rows("world", 4, perturbed=True, n_pert=3)
    # Columns TOFU copies carry that the benchmark does not keep.
    for rows in configs.values():
        for row in rows:
            row["author_id"] = 7
    return configs


def write_configs(root: Path, configs: dict[str, Rows], fmt: str) -> Path:
    for name, rows in configs.items():
        if fmt == "json":
            write_json(root / f"{name}.json", rows)
        elif fmt == "jsonl":
            write_jsonl(root / f"{name}.jsonl", rows)
        elif fmt == "jsonl_as_json":  # what the TOFU hub repo and ``Dataset.to_json`` write
            write_jsonl(root / f"{name}.json", rows)
        elif fmt == "disk":
            save_dataset(root / name, rows)
        elif fmt == "disk_dict":
            save_dataset(root / name, rows, split="train")
        else:
            raise AssertionError(fmt)
    return root


def tofu_cfg(source: Path | str, split: str = "forget10", **tofu_args: Any) -> BenchmarkConfig:
    return BenchmarkConfig(name="tofu", source=str(source), split=split, tofu=tofu_args)


FULL_TOFU_LAYOUT = {
    "forget": ("qa", "forget", 2),
    "retain": ("qa", "utility", 3),
    "holdout": ("qa", "mia", 2),
    "real_authors": ("options", "utility", 3),
    "world_facts": ("options", "utility", 4),
    "retain_train": ("qa", "train", 8),
}


# --- TOFU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl", "jsonl_as_json", "disk", "disk_dict"])
def test_tofu_every_local_format_gives_the_full_benchmark(tmp_path: Path, fmt: str) -> None:
    bench = tofu.load(tofu_cfg(write_configs(tmp_path, tofu_configs(), fmt)))

    assert layout(bench) == FULL_TOFU_LAYOUT
    assert list(bench.splits) == list(FULL_TOFU_LAYOUT)
    assert bench.train == {"target": ["forget", "retain_train"], "oracle": ["retain_train"]}
    assert bench.unlearn == {"forget": "forget", "retain": "retain_train"}
    assert bench.mia == ("forget", "holdout")
    assert bench.forget_quality == "forget"
    assert bench.splits["forget"][1] == {
        "question": "forget question 1?",
        "answer": "forget answer 1.",
        "paraphrased_question": "forget rephrased question 1?",
        "paraphrased_answer": "forget paraphrase 1.",
        "perturbed_answer": [f"forget wrong 1.{k}" for k in range(5)],
    }
    assert all("author_id" not in r for rows in bench.splits.values() for r in rows)
    assert [len(r["perturbed_answer"]) for r in bench.splits["real_authors"]] == [3, 3, 3]
    assert bench.meta["configs"]["forget"] == "forget10_perturbed"
    assert bench.meta["configs"]["retain_train"] == "retain90"
    assert bench.meta["counts"]["world_facts"] == 4
    assert bench.meta["skipped"] == []
    check_serialisable(bench)


def test_tofu_prompt_response_columns(tmp_path: Path) -> None:
    configs = tofu_configs()
    for rows in configs.values():
        for row in rows:
            row["prompt"], row["response"] = row.pop("question"), row.pop("answer")
    bench = tofu.load(tofu_cfg(write_configs(tmp_path, configs, "jsonl")))

    assert layout(bench) == FULL_TOFU_LAYOUT
    assert bench.splits["retain_train"][0] == {"question": "retain question 0?", "answer": "retain answer 0."}
    assert all("prompt" not in r and "response" not in r for rows in bench.splits.values() for r in rows)
    check_serialisable(bench)


def test_tofu_without_optional_configs(tmp_path: Path) -> None:
    """Only forget10 (no perturbed copy), retain90 and retain_perturbed: a benchmark without
    holdout (no MIA), utility option splits or forget quality."""
    configs = tofu_configs(perturbed=False, holdout=False, utility=False)
    bench = tofu.load(tofu_cfg(write_configs(tmp_path, configs, "json")))

    assert layout(bench) == {
        "forget": ("qa", "forget", 2),
        "retain": ("qa", "utility", 3),
        "retain_train": ("qa", "train", 8),
    }
    assert bench.mia is None
    assert bench.forget_quality is None
    assert bench.splits["forget"][0] == {"question": "forget question 0?", "answer": "forget answer 0."}
    assert bench.meta["configs"]["forget"] == "forget10"
    assert bench.meta["skipped"] == ["holdout10", "real_authors_perturbed", "world_facts_perturbed"]
    check_serialisable(bench)


def test_tofu_forget_percent_picks_matching_configs(tmp_path: Path) -> None:
    configs = tofu_configs()
    configs["forget05"] = tofu_rows("f5", 1)
    configs["forget05_perturbed"] = tofu_rows("f5", 1, perturbed=True)
    configs["retain95"] = tofu_rows("r95", 9)
    configs["holdout05"] = tofu_rows("h5", 1)
    bench = tofu.load(tofu_cfg(write_configs(tmp_path, configs, "json"), split="forget05"))

    assert bench.meta["configs"]["forget"] == "forget05_perturbed"
    assert bench.meta["configs"]["holdout"] == "holdout05"
    assert bench.meta["configs"]["retain_train"] == "retain95"
    assert len(bench.splits["retain_train"]) == 9
    assert bench.splits["forget"][0]["question"] == "f5 question 0?"


def test_tofu_retain_eval_config_and_single_string_perturbed_answer(tmp_path: Path) -> None:
    configs = tofu_configs()
    configs["my_retain_eval"] = [
        {"question": "q?", "answer": "a.", "paraphrased_answer": "p.", "perturbed_answer": "wrong."}
    ]
    bench = tofu.load(tofu_cfg(write_configs(tmp_path, configs, "json"), retain_eval="my_retain_eval"))

    assert bench.splits["retain"] == [
        {"question": "q?", "answer": "a.", "paraphrased_answer": "p.", "perturbed_answer": ["wrong."]}
    ]
    assert bench.meta["configs"]["retain"] == "my_retain_eval"


@pytest.mark.parametrize(
    ("missing", "match"),
    [
        ("retain90", r"tofu needs config 'retain90': .*no config 'retain90'"),
        ("retain_perturbed", r"tofu needs config 'retain_perturbed'"),
        ("forget10", r"tofu needs config 'forget10' \(or 'forget10_perturbed'\)"),
    ],
)
def test_tofu_missing_required_config(tmp_path: Path, missing: str, match: str) -> None:
    configs = tofu_configs(perturbed=missing != "forget10")
    del configs[missing]
    write_configs(tmp_path, configs, "json")
    with pytest.raises(UnlearnflowError, match=match) as exc:
        tofu.load(tofu_cfg(tmp_path))
    msg = one_line(exc)
    assert str(tmp_path) in msg
    listed = msg.split(" holds ")[1].split(", ")  # what the directory does hold
    assert missing not in listed and "world_facts_perturbed" in listed


def test_tofu_rows_without_question_columns(tmp_path: Path) -> None:
    configs = tofu_configs()
    configs["retain90"] = [{"q": "x", "a": "y"}]
    write_configs(tmp_path, configs, "json")
    with pytest.raises(UnlearnflowError, match=r"tofu retain90 row 0: expected question/answer .*found a, q"):
        tofu.load(tofu_cfg(tmp_path))


class FakeHub:
    """Stands in for ``datasets.load_dataset``: serves ``{(config, split): rows}`` and records calls."""

    def __init__(self, tables: dict[tuple[str, str], Rows], repo: str) -> None:
        self.tables, self.repo = tables, repo
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, path: str, name: str | None = None, *, split: str | None = None, **kw: Any):
        import datasets

        assert not kw, kw
        assert split is not None
        self.calls.append((path, name, split))
        if path != self.repo:
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        if not any(c == name for c, _ in self.tables):
            raise ValueError(
                f"BuilderConfig '{name}' not found. Available: {sorted({c for c, _ in self.tables})}"
            )
        if (name, split) not in self.tables:
            raise ValueError(f'Unknown split "{split}". Should be one of [...].')
        return datasets.Dataset.from_list(self.tables[name, split])


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[tuple[str, str], Rows], str], FakeHub]:
    import datasets

    def install(tables: dict[tuple[str, str], Rows], repo: str) -> FakeHub:
        hub = FakeHub(tables, repo)
        monkeypatch.setattr(datasets, "load_dataset", hub)
        return hub

    return install


def test_tofu_from_hub_id(fake_hub) -> None:
    configs = tofu_configs(holdout=False)
    hub = fake_hub({(c, "train"): rows for c, rows in configs.items()}, "locuslab/TOFU")
    bench = tofu.load(tofu_cfg("locuslab/TOFU"))

    assert set(bench.splits) == set(FULL_TOFU_LAYOUT) - {"holdout"}
    assert bench.mia is None
    assert bench.forget_quality == "forget"
    assert [c for _, c, _ in hub.calls] == [
        "forget10_perturbed",
        "retain_perturbed",
        "holdout10",
        "real_authors_perturbed",
        "world_facts_perturbed",
        "retain90",
    ]
    assert {(p, s) for p, _, s in hub.calls} == {("locuslab/TOFU", "train")}
    check_serialisable(bench)


def test_hub_errors_are_one_line(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    fake_hub({("forget10", "train"): tofu_rows("f", 1)}, "locuslab/TOFU")
    with pytest.raises(
        UnlearnflowError, match=r"tofu needs config 'retain_perturbed': locuslab/TOFU \(hub\)"
    ) as e:
        tofu.load(tofu_cfg("locuslab/TOFU"))
    one_line(e)
    with pytest.raises(UnlearnflowError, match=r"cannot load nobody/nothing .*DatasetNotFoundError") as e:
        read_records("nobody/nothing", "forget10")
    assert not isinstance(e.value, RecordsNotFound)  # a missing dataset is not an optional part

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError(
            "Couldn't reach 'locuslab/TOFU' on the Hub (LocalEntryNotFoundError)\nmore detail"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UnlearnflowError, match=r"ConnectionError: Couldn't reach") as e:
        tofu.load(tofu_cfg("locuslab/TOFU"))
    one_line(e)


# --- sources ---------------------------------------------------------------------------------------


def test_read_file_json_shapes(tmp_path: Path) -> None:
    rows = [{"question": "q", "answer": "a"}]
    assert read_file(write_json(tmp_path / "list.json", rows)) == rows
    assert read_file(write_json(tmp_path / "data.json", {"data": rows})) == rows
    assert read_file(write_json(tmp_path / "squad.json", {"version": 2, "rows": rows})) == rows
    assert read_file(write_json(tmp_path / "strings.json", ["one", "two"])) == [
        {"text": "one"},
        {"text": "two"},
    ]
    assert read_file(write_json(tmp_path / "keyed.json", {"docs": ["one"]})) == [{"text": "one"}]
    # A lone TOFU row (its only list is perturbed_answer, of strings) is one row, not a container.
    lone = {"question": "q", "answer": "a", "perturbed_answer": ["x", "y"]}
    assert read_file(write_json(tmp_path / "lone.json", lone)) == [lone]
    assert read_file(write_jsonl(tmp_path / "one_line.json", [lone])) == [lone]


def test_read_file_jsonl_txt_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n   \n"b"\n')
    assert read_file(path) == [{"text": "a"}, {"text": "b"}]

    path.write_text('{"text": "a"}\n\n{"text": broken}\n')
    with pytest.raises(UnlearnflowError, match=r"rows\.jsonl line 3: not valid JSON") as e:
        read_file(path)
    one_line(e)

    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(UnlearnflowError, match=r"line 2: expected an object or a string, got list"):
        read_file(path)

    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(UnlearnflowError, match=r"bad\.json: not valid JSON"):
        read_file(bad)
    write_json(bad, 3)
    with pytest.raises(UnlearnflowError, match=r"expected a list of rows, got int"):
        read_file(bad)

    txt = tmp_path / "book.txt"
    txt.write_text("Chapter 1\n\nIt was a dark night.\n")
    assert read_file(txt) == [{"text": "Chapter 1\n\nIt was a dark night.\n"}]


def test_read_records_lookup_order_and_subpaths(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "cfg.jsonl", [{"text": "from jsonl"}])
    write_json(tmp_path / "cfg.json", [{"text": "from json"}])
    (tmp_path / "cfg.txt").write_text("from txt")
    assert read_records(str(tmp_path), "cfg") == [{"text": "from jsonl"}]
    (tmp_path / "cfg.jsonl").unlink()
    assert read_records(str(tmp_path), "cfg") == [{"text": "from json"}]
    (tmp_path / "cfg.json").unlink()
    assert read_records(str(tmp_path), "cfg") == [{"text": "from txt"}]

    # <config>/<split>.{jsonl,json,txt}, and a config with "/" as a sub-path.
    write_json(tmp_path / "knowmem" / "forget_qa.json", [{"question": "q", "answer": "a"}])
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "forget.txt").write_text("a passage")
    assert read_records(str(tmp_path), "knowmem", "forget_qa") == [{"question": "q", "answer": "a"}]
    assert read_records(str(tmp_path), "knowmem/forget_qa") == [{"question": "q", "answer": "a"}]
    assert read_records(str(tmp_path), "raw", "forget") == [{"text": "a passage"}]


def test_read_records_save_to_disk(tmp_path: Path) -> None:
    import datasets

    rows = [{"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]
    save_dataset(tmp_path / "plain", rows)
    save_dataset(tmp_path / "onesplit", rows, split="test")
    save_dataset(tmp_path / "nested" / "forget_qa", rows)
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"forget": ds, "retain": ds.select([0])}).save_to_disk(str(tmp_path / "raw"))

    assert read_records(str(tmp_path), "plain") == rows
    assert read_records(str(tmp_path), "onesplit") == rows  # the only split, whatever its name
    assert read_records(str(tmp_path), "onesplit", "test") == rows
    with pytest.raises(RecordsNotFound, match=r"no split 'train' \(has test\)"):
        read_records(str(tmp_path), "onesplit", "train")  # an explicit split is never swapped for another
    assert read_records(str(tmp_path), "nested", "forget_qa") == rows
    assert read_records(str(tmp_path), "raw", "retain") == rows[:1]
    with pytest.raises(RecordsNotFound, match=r"no split 'holdout' \(has forget, retain\)"):
        read_records(str(tmp_path), "raw", "holdout")


def test_read_records_not_found_lists_what_is_there(tmp_path: Path) -> None:
    write_json(tmp_path / "forget10.json", [])
    write_jsonl(tmp_path / "retain90.jsonl", [])
    (tmp_path / "knowmem").mkdir()
    with pytest.raises(
        RecordsNotFound,
        match=r"no config .forget05. \(tried forget05\.\{jsonl,json,txt\}, save_to_disk dir forget05/\)",
    ) as e:
        read_records(str(tmp_path), "forget05")
    msg = one_line(e)
    assert msg.endswith("./ holds forget10, knowmem/, retain90")
    with pytest.raises(
        RecordsNotFound,
        match=r"no config 'knowmem' split 'forget_qa' \(tried knowmem\.\{jsonl,json,txt\}, knowmem/forget_qa\.\{jsonl,json,txt\}, save_to_disk dir knowmem/ or knowmem/forget_qa/\)",
    ):
        read_records(str(tmp_path), "knowmem", "forget_qa")
    assert read_optional(str(tmp_path), "forget05") is None

    with pytest.raises(UnlearnflowError, match=r"benchmark source directory not found: .*nowhere") as e:
        read_records(str(tmp_path / "nowhere"), "forget10")
    assert not isinstance(e.value, RecordsNotFound)  # a wrong source must not silently skip parts


def test_read_records_hub_config_and_split(fake_hub) -> None:
    hub = fake_hub({("knowmem", "forget_qa"): [{"question": "q", "answer": "a"}]}, "muse-bench/MUSE-News")
    assert read_records("muse-bench/MUSE-News", "knowmem", "forget_qa") == [{"question": "q", "answer": "a"}]
    assert read_records("muse-bench/MUSE-News", "knowmem/forget_qa") == [{"question": "q", "answer": "a"}]
    assert read_optional("muse-bench/MUSE-News", "knowmem", "forget_qa_icl") is None
    assert read_optional("muse-bench/MUSE-News", "verbmem", "forget") is None
    assert hub.calls == [
        ("muse-bench/MUSE-News", "knowmem", "forget_qa"),
        ("muse-bench/MUSE-News", "knowmem", "forget_qa"),
        ("muse-bench/MUSE-News", "knowmem", "forget_qa_icl"),
        ("muse-bench/MUSE-News", "verbmem", "forget"),
    ]


def test_is_local_and_parse_ref(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    assert is_local("mydata") and is_local("./missing") and is_local("/abs") and is_local("~/x")
    assert not is_local("locuslab/TOFU")

    assert parse_ref("wmdp-bio", "cais/wmdp") == ("cais/wmdp", "wmdp-bio")
    assert parse_ref("cais/mmlu:college_biology", "cais/wmdp") == ("cais/mmlu", "college_biology")
    assert parse_ref("/data/mmlu:college_biology", None) == ("/data/mmlu", "college_biology")
    with pytest.raises(UnlearnflowError, match="names no source"):
        parse_ref("wmdp-bio", None)
    for bad in ("cais/mmlu:", ":college_biology"):
        with pytest.raises(UnlearnflowError, match="must be '<hub id or directory>:<config>'"):
            parse_ref(bad, "cais/wmdp")


def test_normalize_and_qa_rows() -> None:
    rows = [{"prompt": "q", "response": "a", "extra": 1}, {"question": "q2", "response": "a2"}]
    assert normalize_qa(rows, "x") == [
        {"question": "q", "answer": "a", "extra": 1},
        {"question": "q2", "answer": "a2"},
    ]
    assert rows[0]["prompt"] == "q"  # input untouched
    assert qa_rows(rows, "x")[0] == {"question": "q", "answer": "a"}
    with pytest.raises(
        UnlearnflowError, match=r"where row 1: expected question/answer \(or prompt/response\)"
    ):
        normalize_qa([{"question": "q", "answer": "a"}, {"question": "q"}], "where")


# --- MUSE ---------------------------------------------------------------------------------------------


def make_muse(root: Path, *, split_retain: bool = True, icl: bool = True) -> Path:
    write_json(root / "raw" / "forget.json", ["forget doc one", "forget doc two", ""])
    if split_retain:
        write_jsonl(root / "raw" / "retain1.jsonl", [{"text": "retain doc one"}])
        write_json(
            root / "raw" / "retain2.json", [{"text": "retain doc two", "id": 3}, {"text": "retain doc 3"}]
        )
    else:
        (root / "raw").mkdir(exist_ok=True)
        (root / "raw" / "retain.txt").write_text("the whole retain corpus")
    write_json(root / "verbmem" / "forget.json", [{"prompt": "Once upon", "gt": "a time", "id": 0}])
    write_json(root / "knowmem" / "forget_qa.json", [{"question": "Who won?", "answer": "Ann"}] * 2)
    write_json(root / "knowmem" / "retain_qa.json", [{"question": "Where?", "answer": "Oslo", "x": 1}])
    if icl:
        write_json(
            root / "knowmem" / "forget_qa_icl.json",
            [{"question": "F1?", "answer": "f1"}, {"question": "F2?", "answer": "f2"}],
        )
        write_json(root / "knowmem" / "retain_qa_icl.json", [{"question": "R1?", "answer": "r1"}])
    write_json(root / "privleak" / "forget.json", ["leak forget one", "leak forget two"])
    write_json(root / "privleak" / "holdout.json", ["leak holdout"])
    write_json(root / "privleak" / "retain.json", ["leak retain"])
    return root


MUSE_LAYOUT = {
    "raw_forget": ("text", "train", 2),
    "raw_retain": ("text", "train", 3),
    "verbmem_forget": ("completion", "forget", 1),
    "knowmem_forget": ("knowmem", "forget", 2),
    "knowmem_retain": ("knowmem", "utility", 1),
    "privleak_forget": ("text", "mia", 2),
    "privleak_holdout": ("text", "mia", 1),
}


def test_muse_local_layout_with_icl(tmp_path: Path) -> None:
    bench = muse.load(BenchmarkConfig(name="muse", source=str(make_muse(tmp_path))))

    assert layout(bench) == MUSE_LAYOUT
    assert bench.train == {"target": ["raw_forget", "raw_retain"], "oracle": ["raw_retain"]}
    assert bench.unlearn == {"forget": "raw_forget", "retain": "raw_retain"}
    assert bench.mia == ("privleak_forget", "privleak_holdout")
    assert bench.forget_quality is None
    assert bench.splits["raw_forget"] == [
        {"text": "forget doc one"},
        {"text": "forget doc two"},
    ]  # "" dropped
    assert bench.splits["raw_retain"] == [
        {"text": "retain doc one"},
        {"text": "retain doc two"},
        {"text": "retain doc 3"},
    ]
    assert bench.splits["verbmem_forget"] == [{"prompt": "Once upon", "gt": "a time"}]
    assert bench.splits["knowmem_forget"][0] == {
        "question": "Who won?",
        "answer": "Ann",
        "few_shot": [{"question": "F1?", "answer": "f1"}, {"question": "F2?", "answer": "f2"}],
    }
    assert bench.splits["knowmem_retain"] == [
        {"question": "Where?", "answer": "Oslo", "few_shot": [{"question": "R1?", "answer": "r1"}]}
    ]
    assert bench.splits["privleak_holdout"] == [{"text": "leak holdout"}]
    assert bench.meta["parts"]["raw_retain"] == "raw/retain1 + raw/retain2"
    assert bench.meta["parts"]["knowmem_forget"] == "knowmem/forget_qa + knowmem/forget_qa_icl"
    check_serialisable(bench)


def test_muse_without_icl_single_retain_and_zero_shot_flag(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        bench = muse.load(
            BenchmarkConfig(name="muse", source=str(make_muse(tmp_path, split_retain=False, icl=False)))
        )
    assert "zero-shot" in caplog.text
    assert bench.splits["raw_retain"] == [{"text": "the whole retain corpus"}]
    assert bench.splits["knowmem_forget"][0] == {"question": "Who won?", "answer": "Ann"}
    assert layout(bench)["raw_retain"] == ("text", "train", 1)
    check_serialisable(bench)

    icl_root = make_muse(tmp_path / "with_icl")
    off = muse.load(BenchmarkConfig(name="muse", source=str(icl_root), muse={"knowmem_few_shot": False}))
    assert all("few_shot" not in r for r in off.splits["knowmem_forget"] + off.splits["knowmem_retain"])


def test_muse_missing_parts(tmp_path: Path) -> None:
    root = make_muse(tmp_path)
    (root / "verbmem" / "forget.json").unlink()
    with pytest.raises(UnlearnflowError, match=r"muse needs config 'verbmem' split 'forget'") as e:
        muse.load(BenchmarkConfig(name="muse", source=str(root)))
    one_line(e)

    root = make_muse(tmp_path / "b")
    for part in ("retain1.jsonl", "retain2.json"):
        (root / "raw" / part).unlink()
    with pytest.raises(UnlearnflowError, match=r"muse needs raw/retain \(or raw/retain1 \+ raw/retain2\)"):
        muse.load(BenchmarkConfig(name="muse", source=str(root)))

    root = make_muse(tmp_path / "c")
    write_json(root / "verbmem" / "forget.json", [{"prompt": "p", "text": "t"}])
    with pytest.raises(
        UnlearnflowError, match=r"verbmem/forget row 0: expected prompt and gt columns, found prompt, text"
    ):
        muse.load(BenchmarkConfig(name="muse", source=str(root)))


def test_muse_from_hub_id(fake_hub) -> None:
    tables = {
        ("raw", "forget"): [{"text": "f"}],
        ("raw", "retain1"): [{"text": "r1"}],
        ("raw", "retain2"): [{"text": "r2"}],
        ("verbmem", "forget"): [{"prompt": "p", "gt": "g"}],
        ("knowmem", "forget_qa"): [{"question": "q", "answer": "a"}],
        ("knowmem", "retain_qa"): [{"question": "q", "answer": "a"}],
        ("knowmem", "forget_qa_icl"): [{"question": "iq", "answer": "ia"}],
        ("knowmem", "retain_qa_icl"): [{"question": "iq", "answer": "ia"}],
        ("privleak", "forget"): [{"text": "pf"}],
        ("privleak", "holdout"): [{"text": "ph"}],
    }
    hub = fake_hub(tables, "muse-bench/MUSE-News")
    bench = muse.load(BenchmarkConfig(name="muse", source="muse-bench/MUSE-News"))

    assert bench.splits["raw_retain"] == [{"text": "r1"}, {"text": "r2"}]
    assert bench.splits["knowmem_retain"][0]["few_shot"] == [{"question": "iq", "answer": "ia"}]
    assert ("muse-bench/MUSE-News", "raw", "retain") in hub.calls  # tried first, then retain1 + retain2
    assert {(c, s) for _, c, s in hub.calls} == set(tables) | {("raw", "retain")}
    check_serialisable(bench)


def _muse_generations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[list[int]], int, tuple]]:
    """Replace the suite's greedy generation with a recorder of (prompts, max_new_tokens, stops)."""
    from unlearnflow.metrics import scored_split

    calls: list[tuple[list[list[int]], int, tuple]] = []

    def record(model, tok, prompts, *, max_new_tokens, batch_size, device, stop_strings=()):
        calls.append(([list(p) for p in prompts], max_new_tokens, tuple(stop_strings)))
        return [""] * len(prompts)

    monkeypatch.setattr(scored_split, "generate_greedy", record)
    return calls


def _loss(model, ids: list[int], labels: list[int]) -> float:
    """The model's own mean NLL over the labelled (shifted) positions: an independent avgNLL."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()


def test_muse_is_evaluated_as_the_reference(tmp_path: Path, sharp_model, tiny_tokenizer, monkeypatch, caplog):
    """open-unlearning's MUSE eval on hand-made MUSE data:

    * privleak texts (CompletionDataset, max_length 2048 of text): ``[bos] text``, every text token
      scored, no EOS, cut at ``text_max_length`` target tokens and never at ``model.max_length``
      (here 4, shorter than the text): avgNLL = the model's loss on exactly those labels;
    * verbmem (insert_space, no EOS): ``[bos] "Once upon"`` then ``" a time"`` scored, and
      ``exact_memorization`` / ``extraction_strength`` run on it; EM = mean argmax hits over the
      continuation's tokens (none left out: no EOS);
    * knowmem: the prompt keeps both ICL examples and ends with "Answer: " (the reference's tags
      "Question: " / "\\n" / "Answer: " / "\\n\\n"), 32 new tokens, MUSE's stop words; verbmem 128.
    """
    import torch

    from unlearnflow.data.tokenize import IGNORE_INDEX
    from unlearnflow.metrics import SuiteOptions, evaluate_splits
    from unlearnflow.metrics.scored_split import KNOWMEM_STOPS

    tok = tiny_tokenizer
    bench = muse.load(BenchmarkConfig(name="muse", source=str(make_muse(tmp_path))))
    calls = _muse_generations(monkeypatch)
    metrics = ["knowmem", "verbmem", "exact_memorization", "extraction_strength", "mia_loss", "mia_min_k"]

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def run(text_max_length: int):
        opts = SuiteOptions(batch_size=4, max_length=4, text_max_length=text_max_length)
        return evaluate_splits(
            sharp_model, tok, bench.splits, bench.layout, metrics=metrics, device="cpu", opts=opts
        )

    res = run(2048)
    bos = tok.bos_token_id
    for rec in res.per_sample["privleak_forget"]:
        text = ids(rec["text"])
        assert 1 + len(text) > 4  # model.max_length would have cut it
        assert rec["nll"] == pytest.approx(_loss(sharp_model, [bos, *text], [IGNORE_INDEX, *text]), abs=1e-5)

    prompt, cont = ids("Once upon"), ids(" a time")
    rec = res.per_sample["verbmem_forget"][0]
    full, labels = [bos, *prompt, *cont], [IGNORE_INDEX] * (1 + len(prompt)) + cont
    assert rec["nll"] == pytest.approx(_loss(sharp_model, full, labels), abs=1e-5)
    with torch.no_grad():
        pred = sharp_model(torch.tensor([full])).logits[0, :-1].argmax(-1)[len(prompt) :]
    assert rec["exact_memorization"] == pytest.approx((pred == torch.tensor(cont)).float().mean().item())
    assert {"verbmem_forget_exact_memorization", "verbmem_forget_extraction_strength"} <= set(res.aggregates)
    assert 0.0 <= res.aggregates["verbmem_forget_extraction_strength"] <= 1.0

    forget_icl = "Question: F1?\nAnswer: f1\n\nQuestion: F2?\nAnswer: f2\n\nQuestion: Who won?\nAnswer: "
    retain_icl = "Question: R1?\nAnswer: r1\n\nQuestion: Where?\nAnswer: "
    assert calls == [  # layout order: verbmem_forget, knowmem_forget, knowmem_retain
        ([[bos, *prompt]], 128, ()),
        ([[bos, *ids(forget_icl)]] * 2, 32, KNOWMEM_STOPS),
        ([[bos, *ids(retain_icl)]], 32, KNOWMEM_STOPS),
    ]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unlearnflow.data.tokenize"):
        cut = run(2)
    texts = [ids(r["text"]) for r in bench.splits["privleak_forget"]]
    for rec, text in zip(cut.per_sample["privleak_forget"], texts, strict=True):
        assert rec["nll"] == pytest.approx(
            _loss(sharp_model, [bos, *text[:2]], [IGNORE_INDEX, *text[:2]]), abs=1e-5
        )
    assert (
        f"split privleak_forget: 2 of 2 targets cut to max_length=2 (longest {max(map(len, texts))} tokens)"
        in [r.getMessage() for r in caplog.records]
    )


def test_muse_plain_text_trains_without_eos(tmp_path: Path, tiny_tokenizer) -> None:
    """Raw corpora (the reference's PretrainingDataset) and continuations train as plain text:
    ``[bos] text`` and ``[bos] prompt " " gt``, no EOS."""
    from unlearnflow.data.tokenize import IGNORE_INDEX, training_examples

    tok = tiny_tokenizer
    bench = muse.load(BenchmarkConfig(name="muse", source=str(make_muse(tmp_path))))

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    windows = training_examples(tok, bench.splits["raw_forget"], "text", max_length=64)
    assert [w["input_ids"] for w in windows] == [
        [tok.bos_token_id, *ids("forget doc one")],
        [tok.bos_token_id, *ids("forget doc two")],
    ]
    (ex,) = training_examples(tok, bench.splits["verbmem_forget"], "completion", max_length=64)
    prompt = [tok.bos_token_id, *ids("Once upon")]
    assert ex["input_ids"] == [*prompt, *ids(" a time")]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + ids(" a time")


def test_generation_cap_defaults_to_the_benchmarks(tmp_path: Path, sharp_model, tiny_tokenizer, monkeypatch):
    """TOFU and custom QA carry the reference's 200 new tokens in their layout (manifest round trip
    included); ``max_new_tokens: None`` in the suite takes the layout's cap, a number overrides it."""
    from unlearnflow.data.benchmark import Layout
    from unlearnflow.metrics import SuiteOptions, evaluate_splits

    bench = tofu.load(tofu_cfg(write_configs(tmp_path, tofu_configs(), "json")))
    assert bench.layout.max_new_tokens == 200
    assert Layout.from_manifest(json.loads(json.dumps(bench.to_manifest()))).max_new_tokens == 200
    forget = write_jsonl(tmp_path / "f.jsonl", qa("f", 2))
    retain = write_jsonl(tmp_path / "r.jsonl", qa("r", 2))
    assert custom.load(custom_cfg(forget, retain)).layout.max_new_tokens == 200

    calls = _muse_generations(monkeypatch)
    layout = Layout(**{**bench.layout.__dict__, "max_new_tokens": 7})
    for cap, want in ((None, 7), (5, 5)):
        calls.clear()
        evaluate_splits(
            sharp_model,
            tiny_tokenizer,
            bench.splits,
            layout,
            metrics=["rouge"],
            device="cpu",
            opts=SuiteOptions(batch_size=8, max_new_tokens=cap),
        )
        assert calls and {c[1] for c in calls} == {want}


# --- WMDP ---------------------------------------------------------------------------------------------


def mcq(question: str, answer: Any, n: int = 4) -> dict[str, Any]:
    return {"question": question, "choices": [f"{question} choice {k}" for k in range(n)], "answer": answer}


def make_wmdp(root: Path) -> tuple[Path, Path]:
    src = root / "wmdp"
    write_jsonl(src / "wmdp-bio.jsonl", [mcq("bio 0", "A"), mcq("bio 1", "d"), mcq("bio 2", " C ")])
    write_json(src / "wmdp-cyber.json", [{**mcq("cyber 0", 2), "subject": "cyber"}])
    write_jsonl(
        src / "bio-forget.jsonl",
        [{"text": "doc 0", "title": "t"}, {"text": "  "}, {"text": "doc 1"}, {"text": "doc 2"}],
    )
    write_jsonl(src / "cyber-forget.jsonl", ["cyber doc 0", "cyber doc 1", "cyber doc 2"])
    write_json(src / "wikitext.json", {"data": ["wiki 0", "", "wiki 1"]})
    mmlu = root / "mmlu"
    write_jsonl(mmlu / "college_biology.jsonl", [mcq("mmlu 0", 1), mcq("mmlu 1", 3)])
    return src, mmlu


def wmdp_cfg(src: Path | str, **wmdp_args: Any) -> BenchmarkConfig:
    return BenchmarkConfig(name="wmdp", source=str(src), wmdp=wmdp_args)


def test_wmdp_local_files(tmp_path: Path) -> None:
    src, mmlu = make_wmdp(tmp_path)
    cfg = wmdp_cfg(
        src,
        forget_mcq=["wmdp-bio", "wmdp-cyber"],
        utility_mcq=[f"{mmlu}:college_biology"],
        forget_corpus=["bio-forget", "cyber-forget"],
        retain_corpus=["wikitext"],
        max_corpus_docs=2,
    )
    bench = wmdp.load(cfg)

    assert layout(bench) == {
        "wmdp-bio": ("mcq", "forget", 3),
        "wmdp-cyber": ("mcq", "forget", 1),
        "mmlu_college_biology": ("mcq", "utility", 2),
        "forget_corpus": ("text", "train", 4),
        "retain_corpus": ("text", "train", 2),
    }
    assert [r["answer"] for r in bench.splits["wmdp-bio"]] == [0, 3, 2]
    assert bench.splits["wmdp-cyber"] == [
        {"question": "cyber 0", "choices": mcq("cyber 0", 2)["choices"], "answer": 2}
    ]
    # Empty documents are dropped before each corpus is cut to max_corpus_docs.
    assert bench.splits["forget_corpus"] == [
        {"text": "doc 0"},
        {"text": "doc 1"},
        {"text": "cyber doc 0"},
        {"text": "cyber doc 1"},
    ]
    assert bench.splits["retain_corpus"] == [{"text": "wiki 0"}, {"text": "wiki 1"}]
    assert bench.train == {"target": ["forget_corpus", "retain_corpus"], "oracle": ["retain_corpus"]}
    assert bench.unlearn == {"forget": "forget_corpus", "retain": "retain_corpus"}
    assert bench.mia is None and bench.forget_quality is None
    assert bench.meta["refs"]["mmlu_college_biology"] == f"{mmlu}:college_biology"
    check_serialisable(bench)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (4, r"answer 4 is not one of the 4 choices \(index 0\.\.3 or letter A\.\.D\)"),
        (-1, r"answer -1 is not one of the 4 choices"),
        ("E", r"answer 'E' is not one of the 4 choices"),
        ("maybe", r"answer must be a choice index or letter, got 'maybe'"),
        (True, r"answer must be a choice index or letter, got True"),
    ],
)
def test_wmdp_bad_answer(tmp_path: Path, answer: Any, match: str) -> None:
    src, _ = make_wmdp(tmp_path)
    write_jsonl(src / "wmdp-bio.jsonl", [mcq("ok", 0), mcq("bad", answer)])
    with pytest.raises(UnlearnflowError, match=r"wmdp wmdp-bio row 1: " + match) as e:
        wmdp.load(
            wmdp_cfg(
                src,
                forget_mcq=["wmdp-bio"],
                utility_mcq=[],
                forget_corpus=["bio-forget"],
                retain_corpus=["wikitext"],
            )
        )
    one_line(e)


def test_wmdp_bad_rows_and_missing_sets(tmp_path: Path) -> None:
    src, _ = make_wmdp(tmp_path)
    args = {"utility_mcq": [], "forget_corpus": ["bio-forget"], "retain_corpus": ["wikitext"]}
    write_jsonl(src / "nochoices.jsonl", [{"question": "q", "answer": 0}])
    with pytest.raises(UnlearnflowError, match=r"row 0: missing column\(s\) choices"):
        wmdp.load(wmdp_cfg(src, forget_mcq=["nochoices"], **args))
    write_jsonl(src / "onechoice.jsonl", [{"question": "q", "choices": ["x"], "answer": 0}])
    with pytest.raises(UnlearnflowError, match=r"choices must be a list of at least 2 strings"):
        wmdp.load(wmdp_cfg(src, forget_mcq=["onechoice"], **args))
    with pytest.raises(UnlearnflowError, match=r"wmdp needs config 'wmdp-chem' split 'test'"):
        wmdp.load(wmdp_cfg(src, forget_mcq=["wmdp-chem"], **args))
    write_jsonl(src / "blank.jsonl", [{"text": " "}])
    with pytest.raises(UnlearnflowError, match=r"wmdp corpus 'blank' has no non-empty document"):
        wmdp.load(wmdp_cfg(src, forget_mcq=["wmdp-bio"], **{**args, "retain_corpus": ["blank"]}))
    write_jsonl(src / "notext.jsonl", [{"body": "x"}])
    with pytest.raises(UnlearnflowError, match=r"wmdp notext row 0: expected a 'text' column, found body"):
        wmdp.load(wmdp_cfg(src, forget_mcq=["wmdp-bio"], **{**args, "retain_corpus": ["notext"]}))


def test_wmdp_split_names() -> None:
    assert wmdp.mcq_split_name("wmdp-bio", "cais/wmdp") == "wmdp-bio"
    assert wmdp.mcq_split_name("cais/mmlu:college_biology", "cais/wmdp") == "mmlu_college_biology"
    assert wmdp.mcq_split_name("/data/mmlu/:high school+bio", None) == "mmlu_high_school_bio"
    assert wmdp.mcq_split_name("sets/bio", "/data") == "sets_bio"
    assert wmdp.mcq_split_name(".hidden", "/data") == "_.hidden"


def test_wmdp_from_hub_with_duplicate_names(fake_hub) -> None:
    tables = {
        ("wmdp-bio", "test"): [mcq("b", 1)],
        ("bio-forget-corpus", "train"): [{"text": "bio doc"}],
        ("wikitext", "train"): [{"text": "wiki doc"}],
    }
    hub = fake_hub(tables, "cais/wmdp")
    cfg = wmdp_cfg(
        "cais/wmdp",
        forget_mcq=["wmdp-bio", "cais/wmdp:wmdp-bio"],
        utility_mcq=["wmdp-bio"],
        forget_corpus=["bio-forget-corpus"],
        retain_corpus=["cais/wmdp:wikitext"],
    )
    bench = wmdp.load(cfg)
    assert layout(bench) == {
        "wmdp-bio": ("mcq", "forget", 1),
        "wmdp_wmdp-bio": ("mcq", "forget", 1),
        "wmdp-bio_2": ("mcq", "utility", 1),
        "forget_corpus": ("text", "train", 1),
        "retain_corpus": ("text", "train", 1),
    }
    assert set(hub.calls) == {
        ("cais/wmdp", "wmdp-bio", "test"),
        ("cais/wmdp", "bio-forget-corpus", "train"),
        ("cais/wmdp", "wikitext", "train"),
    }
    check_serialisable(bench)


# --- custom -------------------------------------------------------------------------------------------


def custom_cfg(forget: Path, retain: Path, holdout: Path | None = None, **args: Any) -> BenchmarkConfig:
    files = {"forget": str(forget), "retain": str(retain), "holdout": str(holdout) if holdout else None}
    return BenchmarkConfig(name="custom", custom={**files, **args})


def qa(prefix: str, n: int, q: str = "question", a: str = "answer") -> Rows:
    return [{q: f"{prefix} q{i}?", a: f"{prefix} a{i}."} for i in range(n)]


def test_custom_qa_with_holdout(tmp_path: Path) -> None:
    forget = write_jsonl(tmp_path / "forget.jsonl", [{**r, "user_id": 1} for r in qa("f", 3)])
    retain = write_json(tmp_path / "retain.json", qa("r", 4))
    holdout = write_jsonl(tmp_path / "holdout.jsonl", qa("h", 2))
    bench = custom.load(custom_cfg(forget, retain, holdout))

    assert layout(bench) == {
        "forget": ("qa", "forget", 3),
        "retain": ("qa", "utility", 4),
        "holdout": ("qa", "mia", 2),
    }
    assert bench.splits["forget"][0] == {"question": "f q0?", "answer": "f a0."}
    assert bench.train == {"target": ["forget", "retain"], "oracle": ["retain"]}
    assert bench.unlearn == {"forget": "forget", "retain": "retain"}
    assert bench.mia == ("forget", "holdout")
    assert bench.forget_quality is None
    assert bench.meta["files"]["holdout"] == str(holdout)
    check_serialisable(bench)


def test_custom_prompt_response_without_holdout(tmp_path: Path) -> None:
    forget = write_jsonl(tmp_path / "forget.jsonl", qa("f", 2, "prompt", "response"))
    retain = write_jsonl(tmp_path / "retain.jsonl", qa("r", 2, "prompt", "response"))
    bench = custom.load(custom_cfg(forget, retain))

    assert bench.splits["retain"][1] == {"question": "r q1?", "answer": "r a1."}
    assert bench.mia is None
    assert set(bench.splits) == {"forget", "retain"}
    check_serialisable(bench)


def test_custom_plain_text_derives_verbmem(tmp_path: Path) -> None:
    ten = " ".join(f"w{i}" for i in range(10))
    forget = write_jsonl(
        tmp_path / "forget.jsonl",
        [
            {"text": "w0 w1\nw2   w3 w4 w5 w6 w7 w8 w9"},  # line breaks and runs of spaces collapse
            "a b c d e",  # a JSON string per line: one word beyond the prefix
            {"text": "too short"},  # exactly-prefix or shorter passages give no probe
            {"text": "s0 s1 s2 s3"},
        ],
    )
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"text": "something else entirely"}])
    holdout = write_jsonl(tmp_path / "holdout.jsonl", ["never seen passage"])
    bench = custom.load(
        custom_cfg(forget, retain, holdout, verbmem_prefix_words=4, verbmem_continuation_words=3)
    )

    assert layout(bench) == {
        "forget": ("text", "forget", 4),
        "retain": ("text", "utility", 1),
        "holdout": ("text", "mia", 1),
        "verbmem_forget": ("completion", "forget", 2),
    }
    assert bench.splits["forget"][1] == {"text": "a b c d e"}
    assert bench.splits["verbmem_forget"] == [
        {"prompt": "w0 w1 w2 w3", "gt": "w4 w5 w6"},
        {"prompt": "a b c d", "gt": "e"},
    ]
    assert ten.split()[4:7] == bench.splits["verbmem_forget"][0]["gt"].split()
    assert bench.train["target"] == ["forget", "retain"]  # verbmem is evaluated, never trained on
    check_serialisable(bench)


def test_custom_text_too_short_for_verbmem(tmp_path: Path, caplog) -> None:
    forget = write_json(tmp_path / "forget.json", ["one two", "three"])
    retain = write_json(tmp_path / "retain.json", qa("r", 1))
    with caplog.at_level(logging.WARNING):
        bench = custom.load(custom_cfg(forget, retain, verbmem_prefix_words=2))
    assert set(bench.splits) == {"forget", "retain"}
    assert layout(bench)["retain"] == ("qa", "utility", 1)  # retain's format is its own
    assert "no verbmem_forget split" in caplog.text


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (
            {
                "forget": qa("f", 3),
                "retain": [*qa("r", 2), {"question": "f  q1?", "answer": "other"}, *qa("f", 1)],
            },
            r"2 forget row\(s\) of .*forget\.jsonl also appear in the retain file .*retain\.jsonl \(first: 'f q0\?'\); "
            r"a model cannot both forget and keep them",
        ),
        (
            {"forget": ["x " * 100], "retain": ["x " * 100]},
            r"1 forget row\(s\) .*\(first: '(x ){30}\.\.\.'\)",
        ),
        (
            {"forget": qa("f", 2), "retain": qa("r", 2), "holdout": [*qa("h", 1), *qa("f", 1)[:1]]},
            r"1 holdout row\(s\) of .*holdout\.jsonl also appear in the forget file .*never saw",
        ),
        (
            {"forget": qa("f", 2), "retain": qa("r", 2), "holdout": qa("r", 2)},
            r"2 holdout row\(s\) of .*holdout\.jsonl also appear in the retain file",
        ),
        (
            {"forget": [], "retain": qa("r", 1)},
            r"forget\.jsonl: the file holds no rows",
        ),
        (
            {"forget": qa("f", 1), "retain": [{"q": "x", "a": "y"}]},
            r"retain\.jsonl row 1: unrecognised columns a, q; expected question/answer, prompt/response, or text",
        ),
        (
            {"forget": [*qa("f", 1), "plain text"], "retain": qa("r", 1)},
            r"forget\.jsonl row 2: a text row, but the file's first row is qa; use one format per file",
        ),
        (
            {"forget": [*qa("f", 1), {"question": " ", "answer": "a"}], "retain": qa("r", 1)},
            r"forget\.jsonl row 2: 'question' is empty",
        ),
        (
            {"forget": qa("f", 1), "retain": [{"text": ""}]},
            r"retain\.jsonl row 1: 'text' is empty",
        ),
        (
            {"forget": [{"question": "q", "answer": 3}], "retain": qa("r", 1)},
            r"forget\.jsonl row 1: 'answer' must be a string, got int",
        ),
        (
            {"forget": [{"question": "q", "answer": None}], "retain": qa("r", 1)},
            r"forget\.jsonl row 1: 'answer' is null",
        ),
        (
            {"forget": qa("f", 1), "retain": qa("r", 1), "holdout": ["text passage"]},
            r"holdout\.jsonl: holdout rows are text but forget rows \(.*\) are qa",
        ),
    ],
)
def test_custom_validation_errors(tmp_path: Path, files: dict[str, list[Any]], match: str) -> None:
    paths = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in files.items()}
    with pytest.raises(UnlearnflowError, match=match) as e:
        custom.load(custom_cfg(paths["forget"], paths["retain"], paths.get("holdout")))
    one_line(e)


def test_custom_file_errors(tmp_path: Path) -> None:
    retain = write_jsonl(tmp_path / "retain.jsonl", qa("r", 1))
    with pytest.raises(UnlearnflowError, match=r"custom data file not found: .*missing\.jsonl") as e:
        custom.load(custom_cfg(tmp_path / "missing.jsonl", retain))
    one_line(e)
    with pytest.raises(UnlearnflowError, match=r"custom data file is a directory, not a file"):
        custom.load(custom_cfg(tmp_path, retain))

    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(UnlearnflowError, match=r"forget\.jsonl line 3: not valid JSON") as e:
        custom.load(custom_cfg(forget, retain))
    one_line(e)

    for name in ("blank.jsonl", "blank.json"):
        blank = tmp_path / name
        blank.write_text("\n  \n")
        with pytest.raises(UnlearnflowError, match=rf"{name}: the file holds no rows"):
            custom.load(custom_cfg(blank, retain))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(qa("f", 1)[0]).encode() + b"\n")
    assert custom.load(custom_cfg(bom, retain)).splits["forget"] == qa("f", 1)


def test_custom_secret_is_checked_and_kept_as_a_list(tmp_path: Path) -> None:
    """A QA row's ``secret`` (a string or a list of strings, found in the answer ignoring case, spacing
    and punctuation) is kept as a list; rows without one stay plain; the retain file may mark too."""
    forget = write_jsonl(
        tmp_path / "forget.jsonl",
        [
            {
                "question": "Where does A live?",
                "answer": "A lives at 42 Larchmere Lane, Port Alderwick.",
                "secret": "42 larchmere LANE",
            },
            {
                "prompt": "What does A have?",
                "response": "A has type-1 diabetes.",
                "secret": ["type 1 diabetes", "A"],
            },
            {"question": "Where was A born?", "answer": "In Meriholm."},
        ],
    )
    retain = write_jsonl(tmp_path / "retain.jsonl", [{**qa("r", 1)[0], "secret": "r a0"}])
    bench = custom.load(custom_cfg(forget, retain))
    assert [r.get("secret") for r in bench.splits["forget"]] == [
        ["42 larchmere LANE"],
        ["type 1 diabetes", "A"],
        None,
    ]
    assert bench.splits["forget"][2] == {"question": "Where was A born?", "answer": "In Meriholm."}
    assert bench.splits["retain"][0]["secret"] == ["r a0"]
    check_serialisable(bench)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            {"question": "q", "answer": "He lives at 42 Larchmere Lane.", "secret": "43 Larchmere Lane"},
            r"forget\.jsonl row 2: secret '43 Larchmere Lane' does not occur in the answer 'He lives at 42 "
            r"Larchmere Lane\.' \(compared ignoring case, spacing and punctuation\)",
        ),
        (
            {"question": "q", "answer": "Larchmere Lanes", "secret": "Larchmere Lane"},  # whole words
            r"forget\.jsonl row 2: secret 'Larchmere Lane' does not occur in the answer",
        ),
        (
            {"question": "q", "answer": "a", "secret": 42},
            r"row 2: 'secret' must be a string or a non-empty list",
        ),
        (
            {"question": "q", "answer": "a", "secret": []},
            r"row 2: 'secret' must be a string or a non-empty list",
        ),
        (
            {"question": "q", "answer": "a", "secret": "  ...  "},
            r"row 2: 'secret' '  \.\.\.  ' has no word to match",
        ),
    ],
)
def test_custom_secret_errors(tmp_path: Path, row: dict[str, Any], match: str) -> None:
    forget = write_jsonl(tmp_path / "forget.jsonl", [*qa("f", 1), row])
    retain = write_jsonl(tmp_path / "retain.jsonl", qa("r", 1))
    with pytest.raises(UnlearnflowError, match=match) as e:
        custom.load(custom_cfg(forget, retain))
    one_line(e)


def test_custom_secret_on_plain_text_is_an_error(tmp_path: Path) -> None:
    forget = write_jsonl(
        tmp_path / "forget.jsonl", [{"text": "a passage"}, {"text": "another", "secret": "another"}]
    )
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"text": "kept"}])
    with pytest.raises(
        UnlearnflowError,
        match=r"forget\.jsonl row 2: 'secret' marks part of an answer, but this file holds plain text",
    ) as e:
        custom.load(custom_cfg(forget, retain))
    one_line(e)
