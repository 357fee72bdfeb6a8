"""The tokenizer a stage writes works anywhere: it adds BOS itself and names a standard class, so a
tool that loads the directory and encodes with default special tokens gets the pipeline's ids."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from unlearnflow.data.tokenize import encode_prompt, encode_qa, format_prompt
from unlearnflow.modeling import save_pretrained

QUESTION = "Where was Alda Voss born?"
ANSWER = "Alda Voss was born in Kerravin."


def test_saved_tokenizer_encodes_prompts_as_the_pipeline(tmp_path, tiny_model, tiny_tokenizer):
    """Reloaded by AutoTokenizer and by the bare ``tokenizers`` library, the saved tokenizer's ids
    for the formatted prompt (default special tokens) equal ``encode_prompt``'s: one BOS, then the
    prompt's BPE tokens; tokenizer_config.json names ``PreTrainedTokenizerFast``, which
    transformers 4.x and 5.x both load (5.x's own name, ``TokenizersBackend``, fails in 4.x)."""
    from transformers import AutoTokenizer

    save_pretrained(tiny_model, tiny_tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"

    pipeline = encode_prompt(tiny_tokenizer, QUESTION)
    text = format_prompt(QUESTION)
    bare = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos = tiny_tokenizer.bos_token_id
    assert pipeline == [bos, *bare.encode(text, add_special_tokens=False).ids]
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == pipeline
    assert bare.encode(text).ids == pipeline


def test_pipeline_encodings_have_one_bos(tiny_tokenizer):
    """The pipeline encodes without special tokens and puts BOS in front itself: a QA example is
    ``[bos] prompt " answer" [eos]`` with BOS once, exactly as with a tokenizer that adds nothing
    (the same BPE model with its post-processor removed), so built-in BOS changes no pipeline ids."""
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    plain.post_processor = None
    without = PreTrainedTokenizerFast(
        tokenizer_object=plain, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert without(format_prompt(QUESTION))["input_ids"][0] != tiny_tokenizer.bos_token_id
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    ids = encode_qa(tiny_tokenizer, QUESTION, ANSWER, max_length=128)["input_ids"]
    expected = [
        bos,
        *plain.encode(format_prompt(QUESTION), add_special_tokens=False).ids,
        *plain.encode(" " + ANSWER, add_special_tokens=False).ids,
        eos,
    ]
    assert ids == expected and ids.count(bos) == 1
    assert encode_qa(without, QUESTION, ANSWER, max_length=128)["input_ids"] == ids
