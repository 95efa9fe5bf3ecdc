"""The built-in tokenizer: exact round trips, single-digit tokens, determinism, save/load."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import spark_mcore.config  # noqa: F401  (must precede data.config: the config package imports it back)
from spark_mcore.config.loader import ConfigError
from spark_mcore.data.arith import arith_problems, worked_solution
from spark_mcore.data.config import DataConfig
from spark_mcore.data.tokenizer import CHAT_TEMPLATE, build_tokenizer, get_tokenizer, load_tokenizer

TEXTS = [
    "",
    "37+45=?",
    "Is the answer correct? Reply Yes or No in \\boxed{}.",
    "Let $x^2 + \\frac{1}{2} = \\sqrt{3}$, so $\\alpha \\le \\pi$ and \\left( a_{ij} \\right).",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά, עברית, 🙂🚀 ∑∫≈≠",
    "tabs\tand\r\nwindows newlines\n\n\n   leading and trailing spaces   ",
    "control \x00\x01\x7f chars and a zero-width\u200bjoiner",
    "specials inline: <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "1234567890 3.14159 -0.5e-10 1,000,000",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def test_special_ids_and_vocab_size(tok: PreTrainedTokenizerFast) -> None:
    assert tok.pad_token_id == 0 and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id == 1 and tok.eos_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [2, 3]
    assert len(tok) == 512
    assert tok.unk_token_id is None


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_exact(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok: PreTrainedTokenizerFast) -> None:
    digit_ids = tok.convert_tokens_to_ids(list("0123456789"))
    assert tok.encode("1234567890", add_special_tokens=False) == digit_ids[1:] + digit_ids[:1]
    corpus = TEXTS + [worked_solution(p) for p in arith_problems([1, 2, 3, 4], "test", 200, 0)]
    for text in corpus:
        for t in tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False)):
            if any(ch.isdigit() for ch in t):
                assert len(t) == 1, (text, t)  # a digit never shares a token


def test_common_pieces_are_one_token(tok: PreTrainedTokenizerFast) -> None:
    assert tok.convert_ids_to_tokens(tok.encode(" \\boxed{", add_special_tokens=False)) == ["Ġ\\boxed{"]
    for word in ["user", "assistant", " carry", " borrow"]:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def _vocab_hash(tok: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()


def test_deterministic_across_builds_and_processes(tok: PreTrainedTokenizerFast) -> None:
    assert tok.get_vocab() == build_tokenizer().get_vocab()
    code = (
        "import hashlib, json\n"
        "from spark_mcore.data.tokenizer import build_tokenizer\n"
        "t = build_tokenizer()\n"
        "print(hashlib.sha256(json.dumps(sorted(t.get_vocab().items())).encode()).hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == _vocab_hash(tok)


def test_extra_corpus_changes_vocab_deterministically() -> None:
    extra = ["Evaluate the hypotenuse of the isosceles triangle."] * 50
    a, b = build_tokenizer(extra_corpus=extra), build_tokenizer(extra_corpus=extra)
    assert a.get_vocab() == b.get_vocab()
    assert len(a.encode(" hypotenuse", add_special_tokens=False)) == 1
    with pytest.raises(TypeError, match="list of strings"):
        build_tokenizer(extra_corpus="not a list")  # type: ignore[arg-type]


def test_save_and_load_give_identical_ids(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    saved = build_tokenizer(tmp_path / "tk")
    assert (tmp_path / "tk" / "tokenizer.json").is_file()
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tk"))
    fast = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tk"))
    for text in TEXTS:
        want = tok.encode(text, add_special_tokens=False)
        assert saved.encode(text, add_special_tokens=False) == want
        assert auto.encode(text, add_special_tokens=False) == want
        assert fast.encode(text, add_special_tokens=False) == want
        assert auto.encode(text) == want  # no bos/eos is added by default
    assert auto.chat_template == CHAT_TEMPLATE
    assert (auto.pad_token_id, auto.eos_token_id) == (0, 1)


def test_get_tokenizer_builds_then_reuses(tmp_path: Path) -> None:
    cfg = DataConfig()
    tok = get_tokenizer(cfg, tmp_path)
    path = tmp_path / "tokenizer" / "tokenizer.json"
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = get_tokenizer(cfg, tmp_path)
    assert path.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert again.get_vocab() == tok.get_vocab()
    explicit = get_tokenizer(DataConfig(tokenizer=str(tmp_path / "tokenizer")), tmp_path / "other")
    assert explicit.get_vocab() == tok.get_vocab() and not (tmp_path / "other").exists()


def test_load_tokenizer_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_tokenizer(tmp_path / "nope")
