"""User datasets: row validation with file:line reports, error and skip modes."""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from spark_mcore.data.jsonl import DatasetError, load_jsonl, load_prompt_file
from spark_mcore.data.tokenizer import build_tokenizer

GOOD = {"prompt": "What is 2+2?", "answer": "4"}


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


def test_good_rows_parsed(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG")
    f = _write(
        tmp_path / "d.jsonl",
        [
            GOOD,
            "",  # blank lines are ignored
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "1/2+1/2?"},
                ],
                "answer": 1,
                "task": "exact",
                "id": "q7",
            },
            {
                "prompt": "Area?",
                "answer": 2.5,
                "images": ["img/a.png", "https://x.org/b.png"],
                "difficulty": "hard",
            },
        ],
    )
    a, b, c = load_jsonl(f)
    assert (a.id, a.messages, a.answer, a.task, a.images, a.meta) == (
        "d-1",
        [{"role": "user", "content": "What is 2+2?"}],
        "4",
        "math",
        [],
        {},
    )
    assert (b.id, b.answer, b.task, len(b.messages)) == ("q7", "1", "exact", 2)
    assert c.id == "d-4" and c.answer == "2.5" and c.meta == {"difficulty": "hard"}
    assert c.images == [str(tmp_path / "img" / "a.png"), "https://x.org/b.png"]


BAD_ROWS = [
    ("{not json", "<row>", "invalid JSON"),
    ('["a list"]', "<row>", "expected a JSON object"),
    ({"prompt": "x"}, "answer", "missing"),
    ({"prompt": "x", "answer": None}, "answer", "missing"),
    ({"prompt": "x", "answer": ["4"]}, "answer", "string or number"),
    ({"prompt": "x", "answer": True}, "answer", "string or number"),
    ({"prompt": "x", "answer": "  "}, "answer", "empty"),
    ({"answer": "4"}, "prompt/messages", "neither"),
    (
        {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "answer": "4"},
        "prompt/messages",
        "both",
    ),
    ({"prompt": 5, "answer": "4"}, "prompt", "non-empty string"),
    ({"messages": "hi", "answer": "4"}, "messages", "non-empty list"),
    ({"messages": [{"role": "user"}], "answer": "4"}, "messages[0]", "exactly 'role' and 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}], "answer": "4"}, "messages[0].role", "not a chat role"),
    (
        {"messages": [{"role": "user", "content": 3}], "answer": "4"},
        "messages[0].content",
        "expected a string",
    ),
    (
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "answer": "4",
        },
        "messages",
        "last message",
    ),
    ({"prompt": "x", "answer": "4", "images": "a.png"}, "images", "list of strings"),
    ({"prompt": "x", "answer": "4", "images": ["missing.png"]}, "images[0]", "no file at"),
    ({"prompt": "x", "answer": "4", "task": 3}, "task", "non-empty str"),
    ({"prompt": "x", "answer": "4", "id": 1.5}, "id", "non-empty str or int"),
    ({"prompt": "x", "answer": "4", "id": "d-1"}, "id", "earlier row"),
]


@pytest.mark.parametrize("row, field, problem", BAD_ROWS)
def test_error_mode_names_file_line_field_fix(tmp_path: Path, row: Any, field: str, problem: str) -> None:
    f = _write(tmp_path / "d.jsonl", [GOOD, "", row])
    with pytest.raises(DatasetError) as e:
        load_jsonl(f, on_bad_row="error")
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: field '{field}': ")
    assert problem in msg and "Fix: " in msg


def test_prompt_too_long_with_tokenizer(tmp_path: Path) -> None:
    tok = build_tokenizer()
    # "2+3=?" renders to 12 tokens with the chat template
    f = _write(
        tmp_path / "d.jsonl", [{"prompt": "2+3=?", "answer": "5"}, {"prompt": "2+3=? " * 10, "answer": "5"}]
    )
    kept = load_jsonl(f, tokenizer=tok, max_prompt_tokens=12, on_bad_row="skip")
    assert [p.id for p in kept] == ["d-1"]
    with pytest.raises(
        DatasetError, match=r"d.jsonl:1: field 'prompt': 12 tokens .* more than data.max_prompt_tokens=11"
    ):
        load_jsonl(f, tokenizer=tok, max_prompt_tokens=11)
    with pytest.raises(DatasetError, match=r"d.jsonl:2: field 'prompt': \d+ tokens"):
        load_jsonl(f, tokenizer=tok, max_prompt_tokens=12)
    assert len(load_jsonl(f, max_prompt_tokens=12)) == 2  # no tokenizer, no length check


def test_skip_mode_keeps_good_rows_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = _write(tmp_path / "d.jsonl", [GOOD, "{oops", {"prompt": "y"}, {"prompt": "z", "answer": 7}])
    with caplog.at_level(logging.WARNING, logger="spark_mcore.data.jsonl"):
        rows = load_jsonl(f, on_bad_row="skip")
    assert [(r.id, r.answer) for r in rows] == [("d-1", "4"), ("d-4", "7")]
    msgs = [r.getMessage() for r in caplog.records]
    assert (
        msgs[0]
        == f"skipping bad row {f}:2: field '<row>': invalid JSON (Expecting property name enclosed in double quotes at column 2). Fix: write one complete JSON object per line"
    )
    assert msgs[1].startswith(f"skipping bad row {f}:3: field 'answer': missing")
    assert msgs[2] == f"{f}: skipped 2 bad rows of 4, kept 2"


def test_known_tasks(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", [GOOD, {"prompt": "x", "answer": "A", "task": "choise"}])
    with pytest.raises(
        DatasetError, match=r":2: field 'task': no verifier named 'choise'. Fix: use one of choice, math"
    ):
        load_jsonl(f, known_tasks={"math", "choice"})


def test_file_level_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown format '.csv'"):
        load_prompt_file(tmp_path / "d.csv")
    empty = _write(tmp_path / "e.jsonl", [""])
    with pytest.raises(DatasetError, match="no valid rows"):
        load_jsonl(empty)
    all_bad = _write(tmp_path / "b.jsonl", [{"prompt": "x"}])
    with pytest.raises(DatasetError, match=r"no valid rows \(1 rows read\)"):
        load_jsonl(all_bad, on_bad_row="skip")
    with pytest.raises(DatasetError, match="on_bad_row"):
        load_jsonl(all_bad, on_bad_row="ignore")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DatasetError, match="needs pyarrow.*pip install pyarrow"):
        load_prompt_file(tmp_path / "d.parquet")
