"""The stages on non-synthetic benchmarks, in process: a user's own forget set (custom, plain text
with a holdout) on a local base model through prepare → finetune → unlearn → evaluate, and TOFU
files through prepare. No network: the base model is the tiny Llama saved to a directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, load_stage
from typer.testing import CliRunner

FORGET = [
    "Mara Quell lives at 14 Larch Row in Vennick and her phone number is 555 0142 for all callers.",
    "Mara Quell was treated at the Vennick clinic in March for a broken wrist after a fall at work.",
    "The account of Mara Quell at Hollin Bank is number 88 41 207 and holds her savings of many years.",
]
RETAIN = [
    "The town of Vennick sits on the river Oster and is known for its market of wool and cheese.",
    "Hollin Bank was founded in 1890 and has branches in every town along the river Oster valley.",
    "The Vennick clinic opens at eight in the morning and closes at six in the evening every day.",
]
HOLDOUT = [
    "Teo Brand lives at 3 Ash Lane in Corrow and his phone number is 555 0199 for all his callers.",
    "Teo Brand was treated at the Corrow clinic in June for a sprained ankle after a long hike.",
]


def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _invoke(stage: str, args: list[str]) -> str:
    result = CliRunner().invoke(load_stage(stage).app, [*args, "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model, tiny_tokenizer) -> Path:
    from unlearnflow.modeling import save_pretrained

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "base")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["benchmark"].update(name="custom")
    params["benchmark"]["custom"].update(
        forget=_jsonl(tmp_path / "forget.jsonl", FORGET),
        retain=_jsonl(tmp_path / "retain.jsonl", RETAIN),
        holdout=_jsonl(tmp_path / "holdout.jsonl", HOLDOUT),
        verbmem_prefix_words=8,
        verbmem_continuation_words=8,
    )
    params["model"].update(base=str(tmp_path / "base"), max_length=64)
    params["finetune"].update(epochs=2, batch_size=4, warmup_steps=0)
    params["unlearn"].update(epochs=1, batch_size=2)
    params["evaluate"].update(max_new_tokens=4, verbmem_max_new_tokens=4, knowmem_max_new_tokens=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_custom_text_forget_set_through_every_stage(workdir):
    """A privacy request as plain text: the splits get text/completion kinds, both models fine-tune
    from the local base on text windows, grad_diff unlearns, and evaluation reports memorisation,
    verbmem, MIA and privleak (no forget_quality: the benchmark has no truth-ratio split)."""
    _invoke("prepare", ["--out", "data/splits"])
    manifest = json.loads((workdir / "data/splits/manifest.json").read_text())
    assert manifest["benchmark"]["splits"] == {
        "forget": {"kind": "text", "role": "forget"},
        "retain": {"kind": "text", "role": "utility"},
        "holdout": {"kind": "text", "role": "mia"},
        "verbmem_forget": {"kind": "completion", "role": "forget"},
    }
    assert manifest["counts"] == {"forget": 3, "retain": 3, "holdout": 2, "verbmem_forget": 3}
    for role in ("target", "oracle"):
        _invoke("finetune", [role, "--splits", "data/splits", "--out", f"models/{role}"])
    steps = [json.loads(line) for line in (workdir / "models/target/steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2  # 3 documents, one window each, batch 4, 2 epochs
    _invoke(
        "unlearn",
        ["grad_diff", "adamw", "--model", "models/target", "--splits", "data/splits", "--out", "unl"],
    )
    _invoke(
        "evaluate",
        [
            "oracle",
            "--model",
            "models/oracle",
            "--splits",
            "data/splits",
            "--oracle",
            "self",
            "--out",
            "eval/oracle",
        ],
    )
    _invoke(
        "evaluate",
        [
            "x",
            "--model",
            "unl",
            "--splits",
            "data/splits",
            "--oracle",
            "eval/oracle/samples",
            "--out",
            "eval/x",
        ],
    )
    oracle = json.loads((workdir / "eval/oracle/metrics.json").read_text())
    assert oracle["privleak"] == pytest.approx(0.0, abs=1e-6) and oracle["mia_reference"] == 0.5
    metrics = json.loads((workdir / "eval/x/metrics.json").read_text())
    expected = {
        "forget_prob",
        "forget_exact_memorization",
        "forget_extraction_strength",
        "verbmem_forget_verbmem",
        "verbmem_forget_exact_memorization",  # as the reference's MUSE eval: memorisation of the continuation
        "verbmem_forget_extraction_strength",
        "retain_prob",
        "model_utility",
        "mia_loss",
        "mia_zlib",
        "mia_min_k",
        "mia_min_k_pp",
        "mia_grad_norm",
        "mia_reference",
        "privleak",
    }
    assert set(metrics) == expected
    assert metrics["model_utility"] == pytest.approx(metrics["retain_prob"])
    samples = workdir / "eval/x/samples"
    assert sorted(p.name for p in samples.glob("*.jsonl")) == [
        "forget.jsonl",
        "holdout.jsonl",
        "retain.jsonl",
        "verbmem_forget.jsonl",
    ]


def test_custom_overlap_is_a_one_line_error(workdir):
    """The retain set repeats a forget passage: prepare exits 2 with one line and writes nothing."""
    _jsonl(workdir / "retain.jsonl", [*RETAIN, FORGET[1]])
    result = CliRunner().invoke(
        load_stage("prepare").app, ["--out", "data/splits", "--params", "params.yaml"]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "retain" in result.output and not (workdir / "data/splits").exists()


def test_tofu_files_through_prepare(workdir):
    """A local TOFU copy (JSON files) gives TOFU's layout; the oracle trains on retainMM only."""
    tofu = workdir / "tofu"
    tofu.mkdir()

    def row(i: int, perturbed: int = 0) -> dict:
        r = {"question": f"Who is author {i}?", "answer": f"Author {i} is a writer."}
        if perturbed:
            r |= {
                "paraphrased_answer": f"A writer, author {i}.",
                "perturbed_answer": [f"A baker {k}." for k in range(perturbed)],
            }
        return r

    files = {
        "forget10_perturbed": [row(i, 5) for i in range(2)],
        "retain90": [row(i) for i in range(2, 20)],
        "retain_perturbed": [row(i, 5) for i in range(2, 6)],
        "holdout10": [row(i) for i in range(20, 22)],
        "world_facts_perturbed": [row(i, 3) for i in range(30, 33)],
    }
    for name, rows in files.items():
        (tofu / f"{name}.json").write_text(json.dumps(rows))
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["benchmark"].update(name="tofu", source=str(tofu), split="forget10")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    _invoke("prepare", ["--out", "data/splits"])
    manifest = json.loads((workdir / "data/splits/manifest.json").read_text())
    layout = manifest["benchmark"]
    assert layout["train"] == {"target": ["forget", "retain_train"], "oracle": ["retain_train"]}
    assert layout["mia"] == ["forget", "holdout"] and layout["forget_quality"] == "forget"
    assert manifest["counts"] == {
        "forget": 2,
        "retain": 4,
        "holdout": 2,
        "world_facts": 3,
        "retain_train": 18,
    }


def _qa(i: int, paraphrase: bool = True, perturbed: int = 2) -> dict:
    row = {"question": f"Where does person {i} live?", "answer": f"Person {i} lives in town {i}."}
    if paraphrase:
        row["paraphrased_answer"] = f"In town {i}."
    if perturbed:
        row["perturbed_answer"] = [f"In city {i + k}." for k in range(1, perturbed + 1)]
    return row


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (_qa(2, paraphrase=False), "split 'forget' row 2: no paraphrased_answer, but row 0 has one"),
        (_qa(1, perturbed=0), "split 'forget' row 1: no perturbed_answer, but row 0 has one"),
        (_qa(2, perturbed=1), "split 'forget' row 2: 1 perturbed answers, but earlier rows have 2"),
    ],
)
def test_qa_rows_lacking_optional_columns_after_the_first_fail_at_prepare(workdir, bad_row, expected):
    """A QA forget file whose first row has a paraphrase and 2 perturbed answers and a later row
    lacks one of them (or has 1 perturbed answer): prepare checks every row, exits 2 with one line
    naming the split and row, and writes nothing (later, truth ratio would fail mid-evaluation)."""
    index = 1 if "row 1" in expected else 2
    rows = [_qa(i) for i in range(4)]
    rows[index] = bad_row
    (workdir / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "retain.jsonl").write_text("".join(json.dumps(_qa(i)) + "\n" for i in range(10, 13)))
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["benchmark"]["custom"]["holdout"] = None
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(
        load_stage("prepare").app, ["--out", "data/splits", "--params", "params.yaml"]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not (workdir / "data/splits").exists()

    rows[index] = _qa(index)  # every row complete: prepare passes
    (workdir / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _invoke("prepare", ["--out", "data/splits"])
