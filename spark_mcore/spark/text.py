"""What a reward task shows of a source prompt and of a response."""

from __future__ import annotations

import re

from spark_mcore.spark.templates import View
from spark_mcore.types import Prompt

# Chat end markers that engines may leave at the end of a decoded response.
_TRAILING_SPECIAL = re.compile(r"(?:\s*(?:<\|[^|<>\s]{1,40}\|>|</s>|<eos>|<end_of_turn>))+\s*$")
TRUNCATION_MARK = "... "


def strip_special_tokens(text: str) -> str:
    """Drop trailing special tokens (`<|im_end|>`, `<|endoftext|>`, `</s>`, ...) and whitespace."""
    return _TRAILING_SPECIAL.sub("", text).strip()


def final_answer(text: str) -> str | None:
    """Content of the response's last `\\boxed{}` (None when it has none)."""
    # Imported lazily: spark/ must not load the verifier package just to be imported.
    from spark_mcore.rewards import extract_boxed

    answer = extract_boxed(text)
    return answer.strip() if answer is not None and answer.strip() else None


def question_text(prompt: Prompt) -> str:
    """The problem as the user stated it: the last user turn of `prompt.messages` (earlier
    turns of a few-shot prompt and system messages are not repeated in reward tasks)."""
    users = [m.get("content") for m in prompt.messages if m.get("role") == "user"]
    text = users[-1].strip() if users and isinstance(users[-1], str) else ""
    if not text:
        raise ValueError(f"prompt '{prompt.id}' has no user message text to recycle; check its messages")
    return text


def show_response(text: str, view: View, max_chars: int = 0) -> tuple[str, View] | None:
    """(text to show, view actually used) for a response, or None when it is empty.

    view "answer" shows the last boxed answer; a response without one falls back to its full
    text (view "cot") so the task still has something to judge. `max_chars` > 0 keeps the last
    characters of a long response, where its final answer is.
    """
    body = strip_special_tokens(text)
    if not body:
        return None
    if view == "answer":
        answer = final_answer(body)
        if answer is not None:
            return answer, "answer"
    if max_chars and len(body) > max_chars:
        body = TRUNCATION_MARK + body[len(body) - max_chars :].lstrip()
    return body, "cot"
