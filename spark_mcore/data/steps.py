"""Reasoning steps of a response, for the SPRM step head (model.step_head): the tokens before
each step delimiter, found in the decoded text so that the result does not depend on how the
tokenizer splits the delimiter (". " can be one token, or "." plus a space glued to the next
number)."""

from __future__ import annotations

import bisect
from typing import Any

__all__ = ["StepFinder", "text_step_positions"]


def text_step_positions(pieces: list[str], delimiter: str, include_end: bool = False) -> list[int]:
    """Token indices that end a step: for each occurrence of `delimiter` in "".join(pieces),
    the token holding the character just before it.

    Args:
        pieces: the decoded text of each response token, in order.
        delimiter: non-empty text that ends a step (e.g. ". " or ".\\n\\n").
        include_end: also the last token with text, when the text does not end in the
            delimiter (the final step, e.g. the boxed answer, has no trailing delimiter).
    Returns:
        increasing, distinct token indices. A delimiter at the very start has nothing before it
        and is skipped; occurrences do not overlap (searching resumes after each one).
    """
    if not delimiter:
        raise ValueError("the step delimiter must be non-empty")
    text = "".join(pieces)
    ends, total = [], 0  # ends[i]: character offset just past token i
    for piece in pieces:
        total += len(piece)
        ends.append(total)
    out: list[int] = []
    start = text.find(delimiter)
    while start >= 0:
        if start > 0:
            tok = bisect.bisect_right(ends, start - 1)  # first token whose end is past char start-1
            if not out or out[-1] != tok:
                out.append(tok)
        start = text.find(delimiter, start + len(delimiter))
    if include_end and text.strip() and not text.rstrip().endswith(delimiter.strip() or delimiter):
        last = max(i for i, p in enumerate(pieces) if p.strip())
        if not out or out[-1] < last:
            out.append(last)
    return out


class StepFinder:
    """`finder(token_ids) -> step positions` (response-relative) with a tokenizer; each token's
    text is decoded once and cached."""

    def __init__(self, tokenizer: Any, delimiter: str, include_end: bool = True) -> None:
        if not delimiter:
            raise ValueError("step_head.delimiter must be non-empty")
        self.tokenizer, self.delimiter, self.include_end = tokenizer, delimiter, include_end
        self._text: dict[int, str] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def piece(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = "" if token_id in self._special else self.tokenizer.decode([token_id])
            self._text[token_id] = text
        return text

    def __call__(self, token_ids: list[int]) -> list[int]:
        return text_step_positions([self.piece(int(t)) for t in token_ids], self.delimiter, self.include_end)
