"""User errors as the command line shows them: one line naming the setting or file (and line) and
the fix, exit 2 (1 for internal errors), the traceback only with --debug; validation before work."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from spark_mcore import errors
from spark_mcore.cli import main
from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.data.dataset import check_sft_ready, sft_examples
from spark_mcore.data.jsonl import DatasetError, load_prompt_file
from spark_mcore.distributed.signals import StopOnSignal
from spark_mcore.errors import SignalExit


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setenv(errors.DEBUG_ENV, "0")  # recorded, so `--debug` setting it is undone after each test
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("override, named", [
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0 must be >= 1"),
    ("model.num_query_groups=0", "model.num_query_groups=0 must be >= 1"),
    ("model.num_query_groups=3", "model.num_query_groups=3 must divide model.num_attention_heads=4"),
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio=1.5 must be in [0, 1]"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
    ("checkpoint.save_on_signal=[SIGKILL]", "checkpoint.save_on_signal[0]='SIGKILL'"),
])
def test_config_ranges_fail_before_work_in_one_line(capsys, override: str, named: str) -> None:
    code, err = _run(capsys, "train", "--set", override)
    line = _one_line(err)
    assert code == 2 and line.startswith("config error: ") and named in line, line


def test_config_file_with_bad_bytes_names_file_and_line(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"data:\n  source: builtin:arith\n  # caf\xe9\n")
    code, err = _run(capsys, "train", "--config", str(cfg))
    line = _one_line(err)
    assert code == 2 and f"{cfg}:3: not UTF-8" in line and "Fix: save the file as UTF-8" in line


def test_debug_shows_the_traceback(capsys, monkeypatch) -> None:
    code, err = _run(capsys, "--debug", "train", "--set", "rollout.max_new_tokens=0")
    assert code == 2 and "Traceback" in err and err.strip().endswith("e.g. rollout.max_new_tokens=64")
    monkeypatch.setenv(errors.DEBUG_ENV, "0")
    code, err = _run(capsys, "train", "--debug", "--set", "rollout.max_new_tokens=0")  # after the command too
    assert code == 2 and "Traceback" in err
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    code, err = _run(capsys, "train", "--set", "rollout.max_new_tokens=0")
    assert code == 2 and "Traceback" in err


def test_internal_error_is_one_line_with_exit_1(capsys) -> None:
    code = errors.report(ZeroDivisionError("division by zero"))
    line = _one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("internal error: ZeroDivisionError: division by zero")
    assert "--debug" in line


def test_known_os_errors_name_the_path() -> None:
    code, msg = errors.describe(PermissionError(errno.EACCES, "Permission denied", "/x/y"))
    assert code == 2 and "'/x/y'" in msg and "Fix:" in msg
    code, msg = errors.describe(OSError(errno.ENOSPC, "No space left on device", "/big/file"))
    assert code == 2 and msg.startswith("disk full") and "/big/file" in msg


def test_under_torchrun_the_first_failing_rank_reports_once_with_its_rank(capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", str(40000 + os.getpid() % 20000))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test-{os.getpid()}-{id(capsys)}")
    monkeypatch.setenv("RANK", "1")
    assert errors.report(ConfigError("model.x bad")) == 2
    assert _one_line(capsys.readouterr().err) == "[rank 1] config error: model.x bad"
    monkeypatch.setenv("RANK", "0")  # the other rank of the same job fails too: silent
    assert errors.report(RuntimeError("peer closed")) == 1
    assert capsys.readouterr().err == ""


def test_checkpoint_dir_under_a_file_fails_before_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, "train", "--set", f"checkpoint.dir={blocker}/run", "--set", "data.train_size=8")
    line = _one_line(err)
    assert code == 2 and f"checkpoint.dir={blocker}/run: cannot write there" in line and "Fix: set checkpoint.dir" in line


def test_checkpoint_dir_read_only(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root ignores permissions: a read-only file system instead
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
        if res.returncode != 0:
            pytest.skip("root ignores directory permissions and cannot mount a read-only tmpfs here")
    try:
        code, err = _run(capsys, "train", "--set", f"checkpoint.dir={ro}/run", "--set", "data.train_size=8")
        line = _one_line(err)
        assert code == 2 and f"checkpoint.dir={ro}/run: cannot write there (" in line
        assert "Fix: set checkpoint.dir to a writable directory" in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)


def test_eval_out_unwritable_fails_before_evaluating(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the checkpoint does not even exist: the output is checked first
    code, err = _run(capsys, "eval", "--checkpoint", str(tmp_path / "none"), "--out", f"{blocker}/x.json")
    line = _one_line(err)
    assert code == 2 and "--out" in line and "cannot write there" in line


def test_eval_of_a_truncated_safetensors_names_the_file(tmp_path: Path, capsys) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)  # 256 promised
    code, err = _run(capsys, "eval", "--checkpoint", str(hf))
    line = _one_line(err)
    assert code == 2 and f"{hf / 'model.safetensors'} is not a readable safetensors file" in line and "Fix:" in line


# ---------------------------------------------------------------- JSONL rows
def test_jsonl_bad_bytes_name_the_line_and_skip_works(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "1+1?", "answer": "2"}).encode()
    f.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9?", "answer": "3"}\n' + good.replace(b"1+1", b"2+2") + b"\n")
    with pytest.raises(DatasetError, match=rf"{f}:2: field '<row>': not UTF-8 text \(byte 0xe9 at byte column 16\)"):
        load_prompt_file(f)
    kept = load_prompt_file(f, on_bad_row="skip")
    assert [p.messages[0]["content"] for p in kept] == ["1+1?", "2+2?"]


def test_jsonl_invalid_json_column_is_the_rows(tmp_path: Path, capsys) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "x"\n')
    with pytest.raises(DatasetError, match=r":2: field '<row>': invalid JSON \(Expecting ',' delimiter at column 15\)"):
        load_prompt_file(f)
    code, err = _run(capsys, "train", "--set", f"data.source={f}", "--set", f"data.eval_source={f}",
                     "--set", "checkpoint.dir=" + str(tmp_path / "run"))
    line = _one_line(err)
    assert code == 2 and line.startswith(f"data error: {f}:2: field '<row>': invalid JSON")


# ---------------------------------------------------------------- warm start on user data
def test_warm_start_reads_row_solutions_or_names_the_fix(tmp_path: Path, capsys) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "1+1?", "answer": "2", "solution": "1+1=2. \\boxed{2}"}) + "\n")
    prompts = load_prompt_file(f)
    assert sft_examples(prompts) == [(prompts[0], "1+1=2. \\boxed{2}")]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(DatasetError, match=r'warmstart.steps=300 .*add a "solution" field.*or set warmstart.steps=0'):
        check_sft_ready(load_prompt_file(bare), "data.source", 300)
    check_sft_ready(load_prompt_file(bare), "data.source", 0)  # no warm start: nothing needed
    # through the command line: fails after reading the data, before the model is built
    code, err = _run(capsys, "train", "--config", "examples/configs/tiny_cpu.yaml", "--set", f"data.source={bare}",
                     "--set", f"data.eval_source={bare}", "--set", f"checkpoint.dir={tmp_path / 'run'}")
    line = _one_line(err)
    assert code == 2 and "warmstart.steps=300" in line and "warmstart.steps=0" in line
    with pytest.raises(ConfigError, match="warmstart.judge_fraction=0.25 .*Fix: set warmstart.judge_fraction=0"):
        load_run_config(None, [f"data.source={bare}", "warmstart.steps=5", "warmstart.judge_fraction=0.25"])


# ---------------------------------------------------------------- signals
def test_second_signal_stops_at_once_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal(["SIGUSR1"], announce=False) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1" and stop.should_stop()
        with pytest.raises(SignalExit) as info:
            os.kill(os.getpid(), signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is before
    code, msg = errors.describe(info.value)
    assert code == 128 + signal.SIGUSR1 and msg.startswith("second SIGUSR1: stopped at once without saving")
