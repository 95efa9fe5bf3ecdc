"""Final-answer extraction (`\\boxed{...}`) and the text normalisations the verifiers share.

Everything here is linear in the input length (no backtracking regexes), so it is safe on
megabyte-long or adversarial responses and needs no timeout.
"""

from __future__ import annotations

import re

# `\box{}` is what some judge prompts ask for, `\fbox{}` is plain LaTeX; `\boxed` is the norm.
# The brace must follow (after optional spaces): `\boxed 5` without braces is not accepted.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox|box)\s*\{")
# Backslash escapes first so that `\{` and `\}` inside an answer (sets) do not count as braces.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# Text-style wrappers whose content is the answer: `\text{Yes}` -> `Yes`. Innermost first.
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING = re.compile(r"\\[,!;: ]|\\(?:quad|qquad|displaystyle)(?![A-Za-z])|~")
_THOUSANDS_INT = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+")
_WHITESPACE = re.compile(r"\s+")
_MAX_UNWRAP_DEPTH = 4


def extract_boxed(text: object) -> str | None:
    """Content of the last `\\boxed{...}` (also `\\box{...}`, `\\fbox{...}`) in `text`.

    Braces inside are balanced, so nested groups are kept whole:
    `"so \\boxed{\\frac{1}{2}}."` -> `"\\frac{1}{2}"`. Returns None when `text` is not a string,
    has no box, or its last box never closes (a truncated response: an earlier complete box is
    deliberately not used, because it was not the final answer).
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_OPEN.finditer(text):  # noqa: B007  (keep the final match)
        pass
    if last is None:
        return None
    start = last.end()
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, start):
        tok = token.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start : token.start()]
    return None


def unwrap_text(s: str) -> str:
    """Remove `$`, `\\text{..}`-style wrappers and surrounding whitespace: `$\\text{ Yes }$` -> `Yes`."""
    s = s.replace("$", "")
    # Bounded passes (one nesting level each) keep adversarial `\text{\text{...}}` towers linear.
    for _ in range(_MAX_UNWRAP_DEPTH):
        unwrapped = _TEXT_WRAPPER.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    return s.strip()


def normalize_math(s: str) -> str:
    """Canonical string form of a math answer for the string-match fallback.

    Drops `$`, whitespace, LaTeX spacing, `\\left`/`\\right`, `\\text{}` wrappers and trailing
    periods; `\\dfrac`/`\\tfrac` -> `\\frac`; `1,000` -> `1000` (only when the whole answer is one
    integer: `(1,234)` may be a pair). Case is kept: `x` and `X` are different variables.
    """
    s = unwrap_text(s)
    s = _LEFT_RIGHT.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING.sub("", s)
    s = _WHITESPACE.sub("", s)
    s = s.rstrip(".")
    if _THOUSANDS_INT.fullmatch(s):
        s = s.replace(",", "")
    return s


def normalize_plain(s: str) -> str:
    """Whitespace- and case-insensitive form: strip, collapse whitespace runs, casefold."""
    return _WHITESPACE.sub(" ", s).strip().casefold()
