"""Chat formatting with the built-in tokenizer (template and fallback agree)."""

from __future__ import annotations

import copy

import pytest
from transformers import PreTrainedTokenizerFast

from spark_mcore.data.chat import encode_prompt, encode_response, render_chat, stop_token_ids
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.types import Prompt


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _prompt(*messages: tuple[str, str]) -> Prompt:
    return Prompt(id="p", messages=[{"role": r, "content": c} for r, c in messages], answer="5")


def test_render_exact_text(tok: PreTrainedTokenizerFast) -> None:
    p = _prompt(("system", "Be brief."), ("user", "2+3=?"))
    want = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3=?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(tok, p.messages) == want
    assert encode_prompt(tok, p) == tok.encode(want, add_special_tokens=False)


def test_encode_prompt_tokens(tok: PreTrainedTokenizerFast) -> None:
    ids = encode_prompt(tok, _prompt(("user", "2+3=?")))
    assert tok.convert_ids_to_tokens(ids) == [
        "<|im_start|>",
        "user",
        "Ċ",
        "2",
        "+",
        "3",
        "=?",
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "assistant",
        "Ċ",
    ]


def test_fallback_without_template_matches(tok: PreTrainedTokenizerFast) -> None:
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    p = _prompt(("user", "What is \\frac{1}{2}+1?"))
    assert encode_prompt(bare, p) == encode_prompt(tok, p)


def test_stop_ids_and_response(tok: PreTrainedTokenizerFast) -> None:
    assert stop_token_ids(tok) == [3, 1]  # <|im_end|>, <|endoftext|>
    ids = encode_response(tok, "3+4=7. \\boxed{7}")
    assert ids[-1] == 3
    assert tok.decode(ids) == "3+4=7. \\boxed{7}<|im_end|>"


def test_empty_messages_rejected(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no messages"):
        encode_prompt(tok, Prompt(id="e", messages=[], answer="1"))
