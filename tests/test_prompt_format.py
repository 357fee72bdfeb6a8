"""Prompt formats (data/tokenize.PromptFormat): the plain template and a tokenizer's chat template,
as open-unlearning renders TOFU for instruction-tuned checkpoints."""

from __future__ import annotations

import copy

import pytest

from unlearnflow.config import ModelConfig, parse_section
from unlearnflow.data.tokenize import IGNORE_INDEX, PLAIN, PromptFormat, encode_prompt, encode_qa
from unlearnflow.errors import ConfigError

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


def test_suite_scores_and_generates_in_the_chat_format(sharp_model, chat_tokenizer):
    """With a chat PromptFormat the suite's avgNLL is the model's own loss on the chat encoding."""
    import torch

    from unlearnflow.data.benchmark import Layout, SplitInfo
    from unlearnflow.data.tokenize import collate
    from unlearnflow.metrics import SuiteOptions, evaluate_splits

    tok, fmt = chat_tokenizer, PromptFormat(chat=True)
    rows = [{"question": "Who?", "answer": "Alda."}, {"question": "Where?", "answer": "In Kerravin."}]
    layout = Layout(
        info={"forget": SplitInfo("qa", "forget"), "retain": SplitInfo("qa", "utility")},
        train={"target": ["forget"], "oracle": ["retain"]},
        unlearn={"forget": "forget", "retain": "retain"},
        mia=None,
        forget_quality=None,
    )
    opts = SuiteOptions(batch_size=2, max_length=96, max_new_tokens=3, prompt=fmt)
    res = evaluate_splits(
        sharp_model,
        tok,
        {"forget": rows, "retain": rows},
        layout,
        metrics=["prob", "rouge"],
        device="cpu",
        opts=opts,
    )
    for rec, row in zip(res.per_sample["forget"], rows, strict=True):
        batch = collate(
            [encode_qa(tok, row["question"], row["answer"], max_length=96, fmt=fmt)], tok.pad_token_id
        )
        with torch.no_grad():
            loss = sharp_model(**batch).loss.item()
        assert rec["nll"] == pytest.approx(loss, abs=1e-5)
        assert isinstance(rec["generation"], str)
