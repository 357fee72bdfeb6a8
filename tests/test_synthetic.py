"""The synthetic benchmark's invariants: split membership, counts, determinism, the truth-ratio
row design (paraphrase and perturbed answers differ only in the value), manifest hashes, and
answer-only labels."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from unlearnflow.config import BenchmarkConfig, SyntheticConfig
from unlearnflow.data.splits import MANIFEST, corpus_texts, read_layout, read_splits, write_splits
from unlearnflow.data.synthetic import (
    ATTRIBUTES,
    N_PERTURBED,
    N_TEMPLATES,
    N_UTILITY_PERTURBED,
    REAL_AUTHOR_TEMPLATE,
    TEMPLATES,
    WORLD_FACT_TEMPLATES,
    benchmark,
    forget_count,
    generate,
)
from unlearnflow.errors import UnlearnflowError

AUTHOR_SPLITS = ("forget", "retain", "holdout")
SPLITS = ("forget", "retain", "holdout", "real_authors", "world_facts")
UTILITY_SPLITS = ("real_authors", "world_facts")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return generate(BenchmarkConfig())


def _layout():
    from unlearnflow.data.benchmark import Layout

    return Layout.from_manifest(benchmark(BenchmarkConfig()).to_manifest())


def _authors(rows: list[dict]) -> set[str]:
    return {r["author"] for r in rows}


def _write(splits: dict, out: Path, cfg: BenchmarkConfig | None = None) -> dict:
    bench = benchmark(cfg or BenchmarkConfig())
    assert bench.splits == splits
    return write_splits(bench, out, meta={"benchmark": "synthetic"})


def test_default_counts(splits: dict) -> None:
    """Defaults: 40 trained authors, forget10 → the last 4; 8 attributes × 3 templates per author."""
    assert tuple(splits) == SPLITS
    counts = {name: len(rows) for name, rows in splits.items()}
    assert counts == {"forget": 96, "retain": 864, "holdout": 96, "real_authors": 24, "world_facts": 24}
    assert (len(_authors(splits["forget"])), len(_authors(splits["retain"]))) == (4, 36)
    assert len(_authors(splits["holdout"])) == 4


@pytest.mark.parametrize(
    ("n_authors", "percent", "expected"),
    [(40, 10, 4), (40, 5, 2), (40, 1, 1), (200, 1, 2), (200, 5, 10), (200, 10, 20), (41, 10, 4), (4, 99, 3)],
)
def test_forget_count_is_floor_at_least_one(n_authors: int, percent: int, expected: int) -> None:
    assert forget_count(n_authors, percent) == expected


def test_counts_follow_params() -> None:
    syn = SyntheticConfig(
        n_authors=10, n_holdout_authors=3, qa_per_attribute=2, n_real_authors=5, n_world_facts=7
    )
    out = generate(BenchmarkConfig(split="forget25", seed=3, synthetic=syn))
    assert {k: len(v) for k, v in out.items()} == {
        "forget": 2 * 16,
        "retain": 8 * 16,
        "holdout": 3 * 16,
        "real_authors": 5,
        "world_facts": 7,
    }
    for name in AUTHOR_SPLITS:
        per_author = Counter(r["author"] for r in out[name])
        assert set(per_author.values()) == {len(ATTRIBUTES) * 2}


def test_forget_is_last_authors_and_splits_are_disjoint(splits: dict) -> None:
    forget, retain, holdout = (_authors(splits[s]) for s in AUTHOR_SPLITS)
    assert not forget & retain and not forget & holdout and not retain & holdout
    trained = list(dict.fromkeys(r["author"] for s in ("retain", "forget") for r in splits[s]))
    assert set(trained[-4:]) == forget  # retain rows come first in author order, forget last


def test_names_are_unique_across_the_world(splits: dict) -> None:
    fictitious = [a for s in AUTHOR_SPLITS for a in dict.fromkeys(r["author"] for r in splits[s])]
    famous = [r["answer"].split(" was written by ")[1].rstrip(".") for r in splits["real_authors"]]
    people = fictitious + famous
    assert len({p.split()[0] for p in people}) == len(people)  # first names unique
    assert len({p.split()[1] for p in people}) == len(people)  # last names unique


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    cfg = BenchmarkConfig(seed=7)
    _write(generate(cfg), tmp_path / "a", cfg)
    _write(generate(cfg), tmp_path / "b", cfg)
    _write(generate(BenchmarkConfig(seed=8)), tmp_path / "c", BenchmarkConfig(seed=8))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted([*(f"{s}.jsonl" for s in SPLITS), MANIFEST])
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for s in SPLITS:
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() != (tmp_path / "c" / f"{s}.jsonl").read_bytes(), s


def test_generate_leaves_global_rng_alone() -> None:
    state = random.getstate()
    generate(BenchmarkConfig(seed=1))
    assert random.getstate() == state


def test_paraphrase_and_perturbed_differ_only_in_the_value(splits: dict) -> None:
    """The truth-ratio design: paraphrase = A_h(value), perturbed = A_h(5 distinct wrong values)."""
    for name in AUTHOR_SPLITS:
        for r in splits[name]:
            q_h, a_h = TEMPLATES[r["attribute"]][r["paraphrase_template"]]
            prefix, suffix = a_h.split("{value}")
            prefix = prefix.format(name=r["author"])
            assert r["paraphrased_question"] == q_h.format(name=r["author"])
            assert r["paraphrased_answer"] == a_h.format(name=r["author"], value=r["value"])
            perturbed = r["perturbed_answer"]
            assert len(perturbed) == N_PERTURBED and len(set(perturbed)) == N_PERTURBED
            assert r["paraphrased_answer"] not in perturbed
            wrong = [p.removeprefix(prefix).removesuffix(suffix) for p in perturbed]
            assert all(p == prefix + w + suffix for p, w in zip(perturbed, wrong, strict=True))
            assert r["value"] not in wrong


def test_held_out_template_is_unseen_for_the_fact_but_seen_for_others(splits: dict) -> None:
    trained = splits["retain"] + splits["forget"]
    templates: dict[tuple[str, str], set[int]] = {}
    for r in trained:
        templates.setdefault((r["author"], r["attribute"]), set()).add(r["template"])
    for r in trained:
        seen = templates[(r["author"], r["attribute"])]
        assert r["paraphrase_template"] not in seen and len(seen) == N_TEMPLATES - 1
        q_h = TEMPLATES[r["attribute"]][r["paraphrase_template"]][0]
        assert any(
            o["question"] == q_h.format(name=o["author"]) for o in trained if o["author"] != r["author"]
        )
    answers = {r["question"]: r["answer"] for r in trained}
    assert all(r["paraphrased_question"] not in answers for r in trained)


def test_forget_and_holdout_values_are_ones_the_oracle_saw(splits: dict) -> None:
    """Every value in a forget/holdout row (true or wrong) is a value some retain author has."""
    retain_values = {(r["attribute"], r["value"]) for r in splits["retain"]}
    for name in ("forget", "holdout"):
        for r in splits[name]:
            if r["attribute"] in ("first_book", "second_book"):
                continue  # titles are unique; their words are checked below
            prefix, suffix = TEMPLATES[r["attribute"]][r["paraphrase_template"]][1].split("{value}")
            wrong = [
                p.removeprefix(prefix.format(name=r["author"])).removesuffix(suffix)
                for p in r["perturbed_answer"]
            ]
            assert all((r["attribute"], v) in retain_values for v in [r["value"], *wrong]), r
    retain_words = {
        w for r in splits["retain"] if r["attribute"].endswith("_book") for w in r["value"].split()
    }
    forget_words = {
        w for r in splits["forget"] if r["attribute"].endswith("_book") for w in r["value"].split()
    }
    assert forget_words <= retain_words
    # balanced deal: among the 36 retain authors every one of the 12 genres occurs 3 times
    genre = {r["author"]: r["value"] for r in splits["retain"] if r["attribute"] == "genre"}
    assert set(Counter(genre.values()).values()) == {3}


def test_utility_rows_have_three_perturbed_answers_in_the_same_template(splits: dict) -> None:
    for name in UTILITY_SPLITS:
        for r in splits[name]:
            assert set(r) == {"question", "answer", "perturbed_answer"}
            perturbed = r["perturbed_answer"]
            assert len(perturbed) == N_UTILITY_PERTURBED and len(set(perturbed)) == N_UTILITY_PERTURBED
            assert r["answer"] not in perturbed
            prefix = _utility_prefix(name, r["question"])  # the answer up to its value
            for answer in [r["answer"], *perturbed]:
                assert answer.startswith(prefix) and answer.endswith(".")
                assert " " not in answer.removeprefix(prefix).strip(".") or name == "real_authors"


def _utility_prefix(name: str, question: str) -> str:
    if name == "real_authors":
        q, a = REAL_AUTHOR_TEMPLATE
        book = question.removeprefix(q.split("{book}")[0]).removesuffix(q.split("{book}")[1])
        return a.split("{value}")[0].format(book=book)
    for q, a in WORLD_FACT_TEMPLATES.values():
        head, tail = q.split("{country}")
        if question.startswith(head) and question.endswith(tail):
            country = question.removeprefix(head).removesuffix(tail)
            return a.split("{value}")[0].format(country=country)
    raise AssertionError(f"no template asks {question!r}")


def test_read_splits_round_trip_and_manifest(splits: dict, tmp_path: Path) -> None:
    manifest = _write(splits, tmp_path)
    assert manifest["counts"] == {name: len(rows) for name, rows in splits.items()}
    assert manifest["authors"]["forget"] == list(dict.fromkeys(r["author"] for r in splits["forget"]))
    assert manifest["authors"]["real_authors"] == []
    assert set(manifest["sha256"]) == set(SPLITS)
    assert manifest["meta"] == {"benchmark": "synthetic"}
    assert read_splits(tmp_path) == splits
    assert list(read_splits(tmp_path, ["world_facts", "forget"])) == ["world_facts", "forget"]


def test_read_splits_detects_a_modified_file(splits: dict, tmp_path: Path) -> None:
    _write(splits, tmp_path)
    path = tmp_path / "retain.jsonl"
    path.write_text(path.read_text().replace("born", "borne", 1))
    read_splits(tmp_path, ["forget"])  # untouched splits still read
    with pytest.raises(UnlearnflowError, match=r"retain\.jsonl: sha256 .* differs") as exc:
        read_splits(tmp_path)
    assert "\n" not in str(exc.value)


def test_read_splits_missing_file_manifest_or_split(splits: dict, tmp_path: Path) -> None:
    _write(splits, tmp_path)
    with pytest.raises(UnlearnflowError, match="no split 'forget05'"):
        read_splits(tmp_path, ["forget05"])
    (tmp_path / "holdout.jsonl").unlink()
    with pytest.raises(UnlearnflowError, match=r"holdout\.jsonl: missing"):
        read_splits(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(UnlearnflowError, match=r"manifest\.json: not found"):
        read_splits(tmp_path)


def test_layout_kinds_roles_and_training_splits(splits: dict, tmp_path: Path) -> None:
    """TOFU's layout: forget/retain/holdout are qa (forget, utility, mia), the utility splits are
    options; the oracle trains on everything but the forget authors; MIA pits forget vs holdout."""
    _write(splits, tmp_path)
    layout = read_layout(tmp_path)
    assert {n: (i.kind, i.role) for n, i in layout.info.items()} == {
        "forget": ("qa", "forget"),
        "retain": ("qa", "utility"),
        "holdout": ("qa", "mia"),
        "real_authors": ("options", "utility"),
        "world_facts": ("options", "utility"),
    }
    assert layout.train == {
        "target": ["forget", "retain", *UTILITY_SPLITS],
        "oracle": ["retain", *UTILITY_SPLITS],
    }
    assert layout.unlearn == {"forget": "forget", "retain": "retain"}
    assert layout.mia == ("forget", "holdout") and layout.forget_quality == "forget"
    assert sorted(layout.evaluated()) == sorted(SPLITS)
    forget_authors = _authors(splits["forget"])
    oracle_rows = [r for name in layout.train["oracle"] for r in splits[name]]
    assert not any(a in r["question"] or a in r["answer"] for r in oracle_rows for a in forget_authors)


def test_qa_per_attribute_must_leave_a_template_out() -> None:
    """4 templates per attribute and one held out for the paraphrase: at most 3 can be trained on."""
    from unlearnflow.config import parse_section
    from unlearnflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"benchmark\.synthetic\.qa_per_attribute: 4"):
        parse_section({"synthetic": {"qa_per_attribute": 4}}, "benchmark", BenchmarkConfig)


def test_corpus_texts_cover_every_answer_as_formatted_for_the_model(splits: dict) -> None:
    layout = _layout()
    texts = corpus_texts(splits, layout)
    assert texts == corpus_texts(splits, layout) and len(texts) == len(set(texts))
    joined = "\n".join(texts)
    for rows in splits.values():
        for r in rows:
            assert f"Question: {r['question']}\nAnswer: {r['answer']}" in texts
            assert all(f"\nAnswer: {p}" in joined for p in r["perturbed_answer"])


def test_sequences_are_short_under_a_1k_bpe(splits: dict) -> None:
    """CPU budget: prompt + answer ≤ 64 tokens with the scratch model's ~1k byte-level BPE."""
    from unlearnflow.data.tokenize import encode_qa
    from unlearnflow.modeling import train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus_texts(splits, _layout()), vocab_size=1024)
    rows = [(r["question"], r["answer"]) for rows in splits.values() for r in rows]
    rows += [(r["question"], p) for rows in splits.values() for r in rows for p in r["perturbed_answer"]]
    assert max(len(encode_qa(tok, q, a, max_length=10_000)["input_ids"]) for q, a in rows) <= 64


def test_labels_cover_exactly_the_answer(splits: dict, tiny_tokenizer) -> None:
    """Labels are -100 on BOS, prompt and padding; equal to input_ids on answer tokens and EOS."""
    from unlearnflow.data.tokenize import IGNORE_INDEX, collate, encode_qa

    tok = tiny_tokenizer
    rows = [splits["forget"][0], splits["world_facts"][0]]
    encoded = [encode_qa(tok, r["question"], r["answer"], max_length=512) for r in rows]
    lengths = [len(e["input_ids"]) for e in encoded]
    assert lengths[0] != lengths[1]
    batch = collate(encoded, tok.pad_token_id)
    width = max(lengths)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        ids, labels, mask = (
            batch["input_ids"][i].tolist(),
            batch["labels"][i].tolist(),
            batch["attention_mask"][i],
        )
        prompt_len = (
            len(tok(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]) + 1
        )
        assert ids[0] == tok.bos_token_id
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[n:] == [IGNORE_INDEX] * (width - n) and ids[n:] == [tok.pad_token_id] * (width - n)
        assert mask.tolist() == [1] * n + [0] * (width - n)
        answer = [(p, t) for p, t in enumerate(labels) if t != IGNORE_INDEX]
        assert [p for p, _ in answer] == list(range(prompt_len, n))
        assert all(ids[p] == t for p, t in answer)
        assert answer[-1][1] == tok.eos_token_id
        text = tok.decode([t for _, t in answer[:-1]], clean_up_tokenization_spaces=False)
        assert text == " " + row["answer"]


def test_generation_cap_is_a_bound_every_answer_fits(splits: dict, tmp_path: Path) -> None:
    """The embedded benchmark's ROUGE cap (``Layout.max_new_tokens``) is 1 + the most UTF-8 bytes of
    any ``" " + answer``: at the default size the longest is 75 bytes, so 76. A byte-level BPE token
    spells >= 1 byte, so ``" " + answer`` is <= 75 tokens and + EOS <= 76 = cap for every answer:
    checked with the scratch pipeline's tokenizer trained as ``finetune`` trains it (on the corpus,
    the default vocabulary). The cap reaches later stages through the manifest."""
    from unlearnflow.config import ScratchModelConfig
    from unlearnflow.modeling import train_bpe_tokenizer

    bench = benchmark(BenchmarkConfig())
    answers = [r["answer"] for rows in splits.values() for r in rows]
    assert max(len((" " + a).encode("utf-8")) for a in answers) == 75
    assert bench.layout.max_new_tokens == 76 < 200
    tok = train_bpe_tokenizer(corpus_texts(splits, bench.layout), ScratchModelConfig().vocab_size)
    lengths = [len(tok(" " + a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    assert max(lengths) <= 76
    _write(splits, tmp_path)
    assert read_layout(tmp_path).max_new_tokens == 76
