"""User prompt datasets: JSONL (and parquet when pyarrow is installed), validated row by row.

One row:
    {"prompt": "What is 2+2?"}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
    "answer": str or number (required)   "images": [str, ...] (optional; relative paths are
    resolved against the dataset's folder and must exist; URLs are kept as they are)
    "task": verifier name (default "math")   "id": str or int (default "<file stem>-<line>")
    "solution": str (optional; the worked solution a warm start (warmstart.steps > 0) trains on)
Other keys are kept in `Prompt.meta`. A null value counts as absent.

A bad row is reported as `FILE:LINE: field 'F': what is wrong. Fix: how`. With
on_bad_row="error" the first one raises DatasetError; with "skip" each is logged as a
warning, followed by a count, and the good rows are kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from spark_mcore.data.chat import encode_prompt
from spark_mcore.data.images import ImageError, bytes_to_data_uri
from spark_mcore.errors import UserError
from spark_mcore.types import Prompt

log = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
ROLES = ("system", "user", "assistant")
_KNOWN_KEYS = {"prompt", "messages", "answer", "images", "task", "id"}
_URL_PREFIXES = ("http://", "https://", "data:", "s3://", "gs://", "file://")


class DatasetError(UserError, ValueError):
    """A dataset file or row is invalid; the message names the file, line, field and fix."""

    label = "data error"


class _RowError(Exception):
    def __init__(self, field: str, problem: str, fix: str) -> None:
        super().__init__(f"field '{field}': {problem}. Fix: {fix}")


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    has_prompt, has_msgs = row.get("prompt") is not None, row.get("messages") is not None
    if has_prompt == has_msgs:
        which = "both" if has_prompt else "neither"
        raise _RowError(
            "prompt/messages", f"the row has {which} of 'prompt' and 'messages'", "give exactly one of them"
        )
    if has_prompt:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise _RowError(
                "prompt",
                f"expected a non-empty string, got {row['prompt']!r:.60}",
                'write "prompt": "question text"',
            )
        return [{"role": "user", "content": row["prompt"]}]
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _RowError(
            "messages", "expected a non-empty list", 'write "messages": [{"role": "user", "content": "..."}]'
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise _RowError(
                f"messages[{i}]",
                f"expected an object with exactly 'role' and 'content', got {m!r:.60}",
                'write {"role": "user", "content": "..."}',
            )
        if m["role"] not in ROLES:
            raise _RowError(
                f"messages[{i}].role", f"{m['role']!r} is not a chat role", f"use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise _RowError(
                f"messages[{i}].content",
                f"expected a string, got {type(m['content']).__name__}",
                "write the message text as a string",
            )
    if msgs[-1]["role"] != "user":
        raise _RowError(
            "messages",
            f"the last message is from {msgs[-1]['role']!r}",
            "end the list with the user's turn; the model writes the next one",
        )
    return [dict(m) for m in msgs]


def _answer(row: dict[str, Any]) -> str:
    ans = row.get("answer")
    if ans is None:
        raise _RowError("answer", "missing", 'add the reference answer, e.g. "answer": "42"')
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise _RowError(
            "answer",
            f"expected a string or number, got {type(ans).__name__}",
            'write the answer as a string, e.g. "answer": "\\\\frac{1}{2}"',
        )
    if not str(ans).strip():
        raise _RowError("answer", "empty", "give a non-empty reference answer")
    return str(ans)


def _image_ref(img: Any) -> Any:
    """Raw bytes (Parquet binary) and HF datasets' {"bytes", "path"} entries -> str refs."""
    if isinstance(img, dict):
        img = img.get("bytes") or img.get("path")
    if isinstance(img, (bytes, bytearray)):
        return bytes_to_data_uri(bytes(img))
    return img


def _images(row: dict[str, Any], base: Path) -> list[str]:
    imgs = row.get("images")
    if imgs is None:
        return []
    imgs = [_image_ref(i) for i in imgs] if isinstance(imgs, list) else imgs
    if not _is_str_list(imgs):
        raise _RowError(
            "images", f"expected a list of strings (paths, data URIs) or image bytes, got {imgs!r:.60}",
            'write "images": ["path/to/image.png"]'
        )
    out = []
    for i, img in enumerate(imgs):
        if img.startswith(_URL_PREFIXES):
            out.append(img)
            continue
        p = Path(img) if Path(img).is_absolute() else base / img
        if not p.is_file():
            raise _RowError(
                f"images[{i}]",
                f"no file at '{p}'",
                "use a path relative to the dataset file's folder, an absolute path or a URL",
            )
        out.append(str(p))
    return out


def _scalar(row: dict[str, Any], key: str, default: str, types: tuple[type, ...]) -> str:
    v = row.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, types) or not str(v).strip():
        kinds = " or ".join(t.__name__ for t in types)
        raise _RowError(key, f"expected a non-empty {kinds}, got {v!r:.60}", f"fix or remove '{key}'")
    return str(v)


def parse_row(row: Any, default_id: str, base: Path, known_tasks: Collection[str] | None = None) -> Prompt:
    """Validates one decoded row; raises _RowError naming the field on the first problem."""
    if not isinstance(row, dict):
        raise _RowError(
            "<row>", f"expected a JSON object, got {type(row).__name__}", "write one {...} object per line"
        )
    messages = _messages(row)
    answer = _answer(row)
    task = _scalar(row, "task", "math", (str,))
    if known_tasks is not None and task not in known_tasks:
        raise _RowError("task", f"no verifier named {task!r}", f"use one of {', '.join(sorted(known_tasks))}")
    pid = _scalar(row, "id", default_id, (str, int))
    if row.get("solution") is not None:  # worked solution for a warm start (kept in meta)
        _scalar(row, "solution", "", (str,))
    meta = {k: v for k, v in row.items() if k not in _KNOWN_KEYS}
    return Prompt(id=pid, messages=messages, answer=answer, task=task, images=_images(row, base), meta=meta)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded row or _RowError); blank lines are skipped.

    Each line is decoded as UTF-8 on its own, so a line with bad bytes is a bad row (named by
    its line and byte column, and skipped under on_bad_row=skip) rather than a failure of the
    whole file."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield lineno, _RowError("<row>", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte column "
                                                 f"{e.start + 1})", "save the file as UTF-8")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the row
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:  # the newline is stripped: colno is the row's column
                yield lineno, _RowError("<row>", f"invalid JSON ({e.msg} at column {e.colno})",
                                        "write one complete JSON object per line")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row dict); needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(
            f"{path}: reading parquet needs pyarrow, which is not installed. Fix: pip install pyarrow, or convert the file to JSONL"
        ) from e
    yield from enumerate(pq.read_table(str(path)).to_pylist(), start=1)


RowReader = Callable[[Path], Iterator[tuple[int, Any]]]
_READERS: dict[str, RowReader] = {".jsonl": _jsonl_rows, ".json": _jsonl_rows, ".parquet": _parquet_rows}


def register_reader(suffix: str, reader: RowReader) -> None:
    """Adds a file format: `reader(path)` yields (line or row number, decoded row)."""
    if suffix in _READERS:
        raise ValueError(f"a dataset reader for '{suffix}' is registered twice")
    _READERS[suffix] = reader


def load_prompt_file(
    path: str | Path,
    on_bad_row: OnBadRow = "error",
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_prompt_tokens: int | None = None,
    known_tasks: Collection[str] | None = None,
    image_check: Callable[[str], None] | None = None,
) -> list[Prompt]:
    """Reads and validates every row of a dataset file (format chosen by suffix).

    image_check(ref) decodes a row's image and raises ImageError when it is bad (missing,
    truncated, not an image): the row is then reported and handled per `on_bad_row`."""
    p = Path(path)
    if on_bad_row not in ("error", "skip"):
        raise DatasetError(f"data.on_bad_row: {on_bad_row!r} is not 'error' or 'skip'")
    if not p.is_file():
        raise DatasetError(
            f"dataset '{p}' does not exist. Fix: set data.source to a .jsonl file or 'builtin:arith'"
        )
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise DatasetError(
            f"dataset '{p}': unknown format '{p.suffix}'. Fix: use one of {', '.join(sorted(_READERS))}"
        )
    good: list[Prompt] = []
    seen: set[str] = set()
    bad = total = 0
    for lineno, row in reader(p):
        total += 1
        try:
            if isinstance(row, _RowError):
                raise row
            prompt = parse_row(row, f"{p.stem}-{lineno}", p.parent, known_tasks)
            if prompt.id in seen:
                raise _RowError(
                    "id", f"{prompt.id!r} appears on an earlier row", "give every row a unique id (or none)"
                )
            _check_length(prompt, tokenizer, max_prompt_tokens)
            _check_images(prompt, image_check)
        except _RowError as e:
            msg = f"{p}:{lineno}: {e}"
            if on_bad_row == "error":
                raise DatasetError(msg) from None
            log.warning("skipping bad row %s", msg)
            bad += 1
            continue
        seen.add(prompt.id)
        good.append(prompt)
    if bad:
        log.warning("%s: skipped %d bad rows of %d, kept %d", p, bad, total, len(good))
    if not good:
        raise DatasetError(
            f'dataset \'{p}\' has no valid rows ({total} rows read). Fix: add rows like {{"prompt": "...", "answer": "..."}}'
        )
    return good


def _check_length(prompt: Prompt, tokenizer: PreTrainedTokenizerBase | None, max_tokens: int | None) -> None:
    if tokenizer is None or max_tokens is None:
        return
    n = len(encode_prompt(tokenizer, prompt))
    if n > max_tokens:
        field = "prompt" if len(prompt.messages) == 1 else "messages"
        raise _RowError(
            field,
            f"{n} tokens with the chat template, more than data.max_prompt_tokens={max_tokens}",
            "shorten the prompt or raise data.max_prompt_tokens",
        )


def _check_images(prompt: Prompt, image_check: Callable[[str], None] | None) -> None:
    for i, ref in enumerate(prompt.images if image_check is not None else ()):
        try:
            image_check(ref)  # type: ignore[misc]
        except ImageError as e:
            raise _RowError(f"images[{i}]", str(e), "replace or remove the image (or set "
                            "data.on_bad_row: skip)") from None


def load_jsonl(path: str | Path, **kwargs: Any) -> list[Prompt]:
    """`load_prompt_file` for a JSONL file (same keyword arguments)."""
    return load_prompt_file(path, **kwargs)


__all__ = ["DatasetError", "ROLES", "parse_row", "register_reader", "load_prompt_file", "load_jsonl"]
