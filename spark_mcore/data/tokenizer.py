"""The small built-in tokenizer for the embedded (CPU, tiny-model) setup.

A byte-level BPE (vocab <= 512) trained at first use on a fixed corpus: builtin arith prompts
and worked solutions plus a short English/LaTeX passage in the register of judge and
reflection prompts. Invariants:
  - every digit is its own token (the pre-tokenizer isolates each digit, and BPE never merges
    across pre-tokens), so carries and column steps are visible to the model;
  - any text encodes without unknown tokens and decodes back exactly (256-byte alphabet, no
    normaliser);
  - same corpus -> same ids (the BPE trainer breaks ties by pair ids, which follow the sorted
    byte alphabet), so a rebuilt tokenizer matches a saved one;
  - ids 0..3 are <|pad|>, <|endoftext|> (eos), <|im_start|>, <|im_end|>.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.arith import arith_problems, available_levels, worked_solution

if TYPE_CHECKING:  # a runtime import would close the cycle data.config -> config -> config.run -> data.config
    from spark_mcore.data.config import DataConfig

log = logging.getLogger(__name__)

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]  # trainer assigns ids in this order: pad = 0
VOCAB_SIZE = 512
TOKENIZER_DIRNAME = "tokenizer"

# Pieces: one digit | LaTeX command with optional "{" (e.g. " \boxed{") | a word with its
# leading space | a punctuation run | whitespace (a trailing space run stays apart from the word).
_PRETOKEN_PATTERN = r"\p{N}| ?\\[A-Za-z]+\{?| ?\p{L}+| ?[^\s\p{L}\p{N}\\]+| ?\\|\s+(?!\S)|\s+"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

# Our own wording, covering the vocabulary of judge / reflection prompts and common LaTeX.
_SEED_TEXT = """\
system user assistant
Question: Is the final answer of the response below correct? Reply Yes or No in \\boxed{}.
Here are two responses, A and B, to the same problem. Which one is better? Put A or B in \\boxed{}.
The following solution may contain a mistake. Check each step, then solve the problem again
and give the corrected final answer in \\boxed{}. This answer is wrong; try once more.
Response A: Response B: Problem: Solution: Answer: Reasoning: Verdict: correct incorrect
right wrong true false step first second third then therefore so because since we have
The sum of the numbers is equal to the product of their difference and a ratio.
Let $x$ be a real number such that $x^2 + 3x - 4 = 0$. Find the value of $\\frac{1}{2}x$.
\\frac{a}{b} \\sqrt{x} \\cdot \\times \\div \\pm \\le \\ge \\neq \\approx \\pi \\theta \\alpha
\\left( \\right) \\text{cm} \\sum_{i=1}^{n} \\int_0^1 f(x)\\,dx \\log \\sin \\cos \\tan
A triangle has sides of length 3, 4 and 5; what is its area? The probability of an event,
the average speed, the total cost, the number of ways, how many integers, what percent.
"""


def _corpus(extra_corpus: Sequence[str]) -> list[str]:
    """The fixed training corpus: arith problems and solutions of every level, the seed text,
    then `extra_corpus`. Its order and content alone determine the vocabulary."""
    texts: list[str] = []
    for p in arith_problems(available_levels(), "train", 2000, seed=1234):
        # Role names follow <|im_start|> in every chat; listing them per example gives them the
        # frequency they have in real prompts, so each becomes a single token.
        texts.extend(("user\n" + p.messages[0]["content"], "assistant\n" + worked_solution(p)))
    texts.extend(_SEED_TEXT.splitlines())
    texts.extend(extra_corpus)
    return texts


def _train_backend(extra_corpus: Sequence[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_corpus), trainer)
    return tok


def build_tokenizer(
    save_dir: str | Path | None = None, extra_corpus: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Trains the built-in tokenizer (well under a second) and, if `save_dir` is given, saves
    it there with `save_pretrained` (loadable with `AutoTokenizer.from_pretrained`)."""
    if isinstance(extra_corpus, str):
        raise TypeError("extra_corpus must be a list of strings, not one string")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend(extra_corpus),
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(save_dir))
    return hf


_GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _from_pretrained(p: Path) -> PreTrainedTokenizerBase:
    """A generic fast tokenizer (ours) is loaded as such: next to a model's config.json,
    AutoTokenizer would pick the model family's class (Qwen2Tokenizer), which swaps in its own
    pre-tokenizer and changes the ids the policy was trained on."""
    cfg_file = p / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if declared in _GENERIC_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(p))
    return AutoTokenizer.from_pretrained(str(p))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Loads a Hugging Face tokenizer directory (ours or a model's) and checks it has a pad id."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(  # a user error (exit 2), not an internal one
            f"data.tokenizer: '{p}' is not a directory; point it at a Hugging Face tokenizer folder"
        )
    tok = _from_pretrained(p)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(
                f"data.tokenizer: '{p}' defines neither a pad nor an eos token; add one to its config"
            )
        tok.pad_token = tok.eos_token  # padding is masked out; any real token id will do
    return tok


def get_tokenizer(
    cfg: DataConfig, run_dir: str | Path, extra_corpus: Sequence[str] = ()
) -> PreTrainedTokenizerBase:
    """`cfg.tokenizer` if set; else `run_dir/tokenizer` if it exists (a resumed run keeps its
    ids); else builds the built-in tokenizer and saves it there."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    local = Path(run_dir) / TOKENIZER_DIRNAME
    if (local / "tokenizer.json").is_file():
        return load_tokenizer(local)
    log.info("building the built-in tokenizer in %s", local)
    build_tokenizer(local, extra_corpus)
    return load_tokenizer(local)


__all__ = [
    "PAD",
    "EOS",
    "IM_START",
    "IM_END",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "load_tokenizer",
    "get_tokenizer",
]
