"""Prompt formats (data/tokenize.PromptFormat): the plain template and a tokenizer's chat template,
as open-unlearning renders TOFU for instruction-tuned checkpoints."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from unlearnflow.config import ModelConfig, parse_section
from unlearnflow.data.benchmark import Layout, SplitInfo
from unlearnflow.data.tokenize import (
    IGNORE_INDEX,
    PLAIN,
    PromptFormat,
    collate,
    encode_prompt,
    encode_qa,
    training_examples,
)
from unlearnflow.errors import ConfigError
from unlearnflow.metrics import SuiteOptions, evaluate_splits

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

# A Llama-3-like template: BOS once, role headers, an end-of-turn marker after every message.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_format_is_the_question_template_with_the_answer_after_a_space(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_qa(tok, "Who?", "Alda.", max_length=64)
    prompt = [tok.bos_token_id, *_ids(tok, "Question: Who?\nAnswer:")]
    assert enc["input_ids"] == [*prompt, *_ids(tok, " Alda."), tok.eos_token_id]
    assert enc["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert encode_prompt(tok, "Who?") == prompt == PLAIN.prompt_ids(tok, "Who?")


def test_chat_format_targets_the_assistant_turn_and_appends_eos(chat_tokenizer):
    """Prompt = the rendered system + user turns and the generation prompt (one BOS); target = the
    answer and the template's end-of-turn text, then EOS (open-unlearning's preprocess_chat_instance)."""
    tok = chat_tokenizer
    fmt = PromptFormat(chat=True, system_prompt="Be brief.")
    enc = encode_qa(tok, "Who?", "Alda.", max_length=96, fmt=fmt)
    prompt_text = "<|system|>Be brief.<|end|><|user|>Who?<|end|><|assistant|>"
    prompt = [tok.bos_token_id, *_ids(tok, prompt_text)]
    target = [*_ids(tok, "Alda.<|end|>"), tok.eos_token_id]
    full = [tok.bos_token_id, *_ids(tok, prompt_text + "Alda.<|end|>")]
    assert enc["input_ids"] == [*full, tok.eos_token_id]
    assert enc["input_ids"][: len(prompt)] == prompt and enc["input_ids"].count(tok.bos_token_id) == 1
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + enc["input_ids"][len(prompt) :]
    assert len(enc["input_ids"]) - len(prompt) == len(target)
    assert encode_prompt(tok, "Who?", fmt=fmt) == prompt


def test_chat_format_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        encode_qa(tiny_tokenizer, "Who?", "Alda.", max_length=64, fmt=PromptFormat(chat=True))
    with pytest.raises(ConfigError, match=r"model\.chat_template needs a pretrained tokenizer"):
        parse_section({"chat_template": True}, "model", ModelConfig)
    cfg = parse_section(
        {"base": "some/model", "chat_template": True, "system_prompt": "Hi"}, "model", ModelConfig
    )
    assert PromptFormat(**cfg.prompt_kwargs()) == PromptFormat(chat=True, system_prompt="Hi")


def _qa_layout() -> Layout:
    return Layout(
        info={"forget": SplitInfo("qa", "forget"), "retain": SplitInfo("qa", "utility")},
        train={"target": ["forget"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=None,
        forget_quality=None,
    )


def _greedy(model, tok, prompt: list[int], max_new_tokens: int) -> str:
    """An independent greedy decoder: one unbatched, unpadded forward pass per new token (no
    ``generate``, no cache), stopped at EOS, decoded without special tokens and stripped."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_suite_scores_and_generates_in_the_chat_format(sharp_model, chat_tokenizer):
    """With a chat PromptFormat the suite's avgNLL is the model's own loss on the chat encoding, and
    each generation is what an independent greedy loop produces from the chat prompt (one BOS, the
    user turn, the generation prompt), so a plain-format, mis-padded or mis-ordered prompt shows."""
    tok, fmt = chat_tokenizer, PromptFormat(chat=True, system_prompt="Be brief.")
    rows = [
        {"question": "Who?", "answer": "Alda."},
        {"question": "Where was Alda Voss born?", "answer": "In Kerravin."},
        {"question": "What genre does Brom Tellan write?", "answer": "Mysteries."},
    ]
    opts = SuiteOptions(batch_size=2, max_length=96, max_new_tokens=6, prompt=fmt)
    res = evaluate_splits(
        sharp_model,
        tok,
        {"forget": rows, "retain": rows},
        _qa_layout(),
        metrics=["prob", "rouge"],
        device="cpu",
        opts=opts,
    )
    expected = [_greedy(sharp_model, tok, encode_prompt(tok, r["question"], fmt=fmt), 6) for r in rows]
    assert len(set(expected)) > 1  # the prompts lead to different continuations: ordering shows
    for rec, row, want in zip(res.per_sample["forget"], rows, expected, strict=True):
        batch = collate(
            [encode_qa(tok, row["question"], row["answer"], max_length=96, fmt=fmt)], tok.pad_token_id
        )
        with torch.no_grad():
            loss = sharp_model(**batch).loss.item()
        assert rec["nll"] == pytest.approx(loss, abs=1e-5)
        assert rec["generation"] == want


# --- the published-checkpoint recipe: TOFU as open-unlearning renders it for Llama-3.2-1B-Instruct ---

# The structure of Llama 3.x Instruct's chat template (meta-llama/Llama-3.2-1B-Instruct
# tokenizer_config.json), without its tool-calling branches: BOS, a system header whose first lines
# are the knowledge cutoff and "Today Date: {date_string}" (today's date when none is passed), the
# system message, then one header + trimmed content + <|eot_id|> per message.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
# A TOFU row (forget10's format: question / answer).
TOFU_Q = "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?"
TOFU_A = (
    "The full name of the fictitious author born in Kuwait City, Kuwait on the 8th of September, 1956 "
    "is Basil Mahfouz Al-Kuwaiti."
)


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """A byte-level BPE built here (no hub) with Llama 3's special tokens and chat template; like
    Llama-3.2-Instruct's, its EOS is <|eot_id|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOFU_Q, TOFU_A, "Question: Who won?\nAnswer: Ann"] * 4, trainer=trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    out.chat_template = LLAMA3_TEMPLATE
    return out


def _recipe_model_section() -> dict:
    """The ``model`` section of the published-checkpoint recipe in docs/benchmarks.md."""
    section = DOCS.read_text().split("## Published checkpoints", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "docs/benchmarks.md: the published-checkpoint recipe has no yaml block"
    return yaml.safe_load(block.group(1))["model"]


def test_published_recipe_renders_tofu_exactly_as_the_reference(llama3_tokenizer):
    """The docs recipe's model section, through PromptFormat / encode_qa, gives the ids of the string
    open-unlearning builds for its Llama-3.2-1B-Instruct TOFU checkpoints (configs/model/
    Llama-3.2-1B-Instruct.yaml: apply_chat_template, system_prompt "You are a helpful assistant.",
    date_string "10 Apr 2025"; src/data/utils.py preprocess_chat_instance): the whole
    conversation tokenised once (``chat_ids``), the prompt with the generation header
    (``prompt_ids``) masked, the answer and its <|eot_id|> (= EOS, so none appended) scored.
    The string is assembled by hand below, and it fits the recipe's max_length (no cut)."""
    tok = llama3_tokenizer
    cfg = parse_section(_recipe_model_section(), "model", ModelConfig)
    fmt = PromptFormat(**cfg.prompt_kwargs())
    prompt_text = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 10 Apr 2025\n\n"
        "You are a helpful assistant.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{TOFU_Q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    full_text = prompt_text + TOFU_A + "<|eot_id|>"
    chat_ids = tok(full_text, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert chat_ids[: len(prompt_ids)] == prompt_ids  # the answer starts a new pre-token

    enc = encode_qa(tok, TOFU_Q, TOFU_A, max_length=cfg.max_length, fmt=fmt)

    assert enc["input_ids"] == chat_ids
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + chat_ids[len(prompt_ids) :]
    assert enc["labels"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
    assert chat_ids.count(tok.bos_token_id) == 1 and len(chat_ids) < cfg.max_length
    assert encode_prompt(tok, TOFU_Q, fmt=fmt) == prompt_ids  # what ROUGE generates from
    # Without the recipe's date string the template writes today's date: not the reference's ids.
    undated = PromptFormat(chat=True, system_prompt=cfg.system_prompt)
    assert encode_qa(tok, TOFU_Q, TOFU_A, max_length=cfg.max_length, fmt=undated)["input_ids"] != chat_ids


def test_few_shot_prompts_end_as_the_references(tiny_tokenizer, llama3_tokenizer):
    """MUSE knowmem's few-shot prompt (open-unlearning QADataset with few_shot_dataset_hf_args ->
    preprocess_chat_instance). Plain: its Llama-2-7b-hf tags, user_start "Question: ", user_end
    "\\n", asst_start "Answer: ", asst_end "\\n\\n", so the prompt ends with "Answer: " (trailing
    space). Chat: every example a user turn and an assistant turn, then the question's user turn
    and the generation header."""
    shots = [{"question": "F1?", "answer": "f1"}, {"question": "F2?", "answer": "f2"}]
    tok = tiny_tokenizer
    text = "Question: F1?\nAnswer: f1\n\nQuestion: F2?\nAnswer: f2\n\nQuestion: Who won?\nAnswer: "
    want = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert PLAIN.few_shot_prompt_ids(tok, "Who won?", shots) == want
    zero = [tok.bos_token_id, *tok("Question: Who won?\nAnswer: ", add_special_tokens=False)["input_ids"]]
    assert PLAIN.few_shot_prompt_ids(tok, "Who won?") == zero

    tok = llama3_tokenizer
    fmt = PromptFormat(chat=True, system_prompt="You are a helpful assistant.", date_string="10 Apr 2025")
    turn = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
    chat = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\n"
        "You are a helpful assistant.<|eot_id|>"
        + turn.format("user", "F1?")
        + turn.format("assistant", "f1")
        + turn.format("user", "F2?")
        + turn.format("assistant", "f2")
        + turn.format("user", "Who won?")
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert fmt.few_shot_prompt_ids(tok, "Who won?", shots) == tok(chat, add_special_tokens=False)["input_ids"]


# --- truncation is a warning with counts ---------------------------------------------------------


def _len(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_training_targets_cut_by_max_length_are_one_warning_with_counts(tiny_tokenizer, caplog):
    """A plain QA example is BOS + prompt + " " + answer + EOS: n = 1 + |prompt| + |answer| + 1.
    With max_length between the short and the long row's n, exactly the long one is cut: one
    warning "split forget: 1 of 2 targets cut to max_length=L (longest n_long tokens)"; at
    max_length = n_long nothing is cut and nothing is logged."""
    tok = tiny_tokenizer
    rows = [
        {"question": "Who?", "answer": "Alda."},
        {"question": "Where was Alda Voss born?", "answer": "Alda Voss was born in Kerravin, in 1957."},
    ]
    n = [
        1 + _len(tok, f"Question: {r['question']}\nAnswer:") + _len(tok, " " + r["answer"]) + 1 for r in rows
    ]
    assert n[0] < n[1] - 2
    cap = n[1] - 2
    with caplog.at_level(logging.WARNING, logger="unlearnflow.data.tokenize"):
        out = training_examples(tok, rows, "qa", max_length=cap, split="forget")
    assert [len(e["input_ids"]) for e in out] == [n[0], cap]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [f"split forget: 1 of 2 targets cut to max_length={cap} (longest {n[1]} tokens)"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unlearnflow.data.tokenize"):
        training_examples(tok, rows, "qa", max_length=n[1], split="forget")
    assert caplog.records == []


def test_suite_warns_per_split_on_cut_targets(sharp_model, tiny_tokenizer, caplog):
    """Scoring counts every encoded target of a split (answer, paraphrase, perturbed): a qa split
    whose two answers exceed max_length is "2 of 6" (2 rows × (answer + paraphrase + 1 perturbed))
    when only the long answers are cut; the short split logs nothing."""
    tok = tiny_tokenizer
    long = "Alda Voss was born in Kerravin, in 1957, and writes gothic mystery novels."
    rows = [
        {"question": q, "answer": long, "paraphrased_answer": "Kerravin.", "perturbed_answer": ["Delmsford."]}
        for q in ("Who?", "Where?")
    ]
    n = [1 + _len(tok, f"Question: {r['question']}\nAnswer:") + _len(tok, " " + long) + 1 for r in rows]
    short_n = 1 + _len(tok, "Question: Where?\nAnswer:") + _len(tok, " Delmsford.") + 1
    cap = min(n) - 1
    assert short_n <= cap
    short = [{"question": "Who?", "answer": "Alda."}]
    perturbed = SplitInfo("qa", "forget", perturbed=True)  # the rows carry truth-ratio inputs
    with caplog.at_level(logging.WARNING, logger="unlearnflow.data.tokenize"):
        evaluate_splits(
            sharp_model,
            tok,
            {"forget": rows, "retain": short},
            Layout(**{**_qa_layout().__dict__, "info": {**_qa_layout().info, "forget": perturbed}}),
            metrics=["prob", "truth_ratio"],
            device="cpu",
            opts=SuiteOptions(batch_size=4, max_length=cap, max_new_tokens=2),
        )
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [f"split forget: 2 of 6 targets cut to max_length={cap} (longest {max(n)} tokens)"]
