"""Failures as users meet them: which exceptions are user errors, and how a command reports one.

A leaf module (imports nothing from the package): every layer may raise these.

- `UserError` (and its kinds below, plus `ConfigError` / `DatasetError`, which derive from it):
  the input or the environment is wrong; the message names the setting or the file (and line)
  and the fix. Exit code 2.
- Known foreign exceptions with a clear user-side cause (a missing or unwritable file, a full
  disk, a damaged safetensors file) are rendered the same way by `describe`. Exit code 2.
- Anything else is an internal error: one line with its type, exit code 1.
- `Interrupted`: a signal stopped the run after its checkpoint was written; exit 128 + signal.

`report(exc)` prints one line (the traceback only with `--debug` or `SPARK_MCORE_DEBUG=1`).
Under torchrun the line carries the rank, and only the first failing rank on a node prints it:
the others fail because their peer left, which is not news.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path

DEBUG_ENV = "SPARK_MCORE_DEBUG"
USER_ERROR, INTERNAL_ERROR = 2, 1


class UserError(Exception):
    """Bad input or environment; the message names the setting or file and the fix."""

    label = "error"


class CheckpointError(UserError):
    """A checkpoint is incomplete, damaged or does not fit this run."""

    label = "checkpoint error"


class OutputError(UserError):
    """An output location (checkpoint.dir, --out, ...) cannot be written."""

    label = "output error"


class DiskFullError(OutputError):
    """The disk filled up while writing; names the directory and the bytes needed."""

    label = "disk full"


class Interrupted(Exception):
    """A signal stopped the run after it saved; `where` is the checkpoint written (or None)."""

    def __init__(self, signame: str, signum: int, where: str | None, detail: str = "") -> None:
        self.signame, self.signum, self.where = signame, signum, where
        saved = f"saved checkpoint {where}; run the same command again to resume" if where else \
            "no checkpoint was written"
        super().__init__(f"stopped by {signame}{detail}: {saved}")


class SignalExit(KeyboardInterrupt):
    """A second stop signal: the run stops at once, without saving the current step."""

    def __init__(self, signame: str, signum: int) -> None:
        self.signame, self.signum = signame, signum
        super().__init__(f"second {signame}: stopped at once without saving the current step; the next run "
                         "resumes from the newest complete checkpoint")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _os_error(e: OSError) -> tuple[int, str] | None:
    """An OSError naming a path is a user-side problem (permissions, missing, full disk)."""
    path = e.filename or getattr(e, "filename2", None)
    if e.errno == errno.ENOSPC:
        where = f" writing '{path}'" if path else ""
        return USER_ERROR, f"disk full: no space left on device{where}. Fix: free space or write elsewhere"
    if path is None:
        return None
    fixes = {errno.EACCES: "check its permissions or choose another location",
             errno.EROFS: "the file system is read-only: choose another location",
             errno.ENOENT: "check the path",
             errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
             errno.EISDIR: "the path is a directory: give a file path"}
    fix = fixes.get(e.errno, "check the path")
    return USER_ERROR, f"file error: '{path}': {e.strerror or e}. Fix: {fix}"


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that reached the command line."""
    if isinstance(exc, Interrupted):
        return 128 + exc.signum, str(exc)
    if isinstance(exc, SignalExit):
        return 128 + exc.signum, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted (Ctrl-C)"
    if isinstance(exc, UserError):
        label = getattr(exc, "label", "error")
        return USER_ERROR, f"{label}: {exc}"
    if isinstance(exc, OSError):
        found = _os_error(exc)
        if found is not None:
            return found
    if type(exc).__name__ == "SafetensorError":  # safetensors' own class, not importable cheaply
        return USER_ERROR, f"damaged safetensors file: {exc}. Fix: re-export or re-download it"
    if isinstance(exc, UnicodeDecodeError):
        return USER_ERROR, f"a file is not UTF-8 text ({exc}). Fix: save it as UTF-8"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return INTERNAL_ERROR, (f"internal error: {type(exc).__name__}: {first[:500]} "
                            f"(rerun with --debug for the traceback, and please report it)")


def _rank() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _first_on_node() -> bool:
    """True for the first rank of this torchrun job (on this node) to report a failure.

    The ranks share their launcher (the parent process) and MASTER_PORT; an O_EXCL marker file
    named after them decides who is first."""
    key = "-".join([os.environ.get("TORCHELASTIC_RUN_ID", "run"), os.environ.get("MASTER_PORT", "0"),
                    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), str(os.getppid())])
    marker = Path(tempfile.gettempdir()) / f"spark_mcore-failed-{key}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True  # no shared temp dir: better twice than never


def report(exc: BaseException, debug: bool | None = None, stream=None) -> int:
    """Prints `exc` as one line (plus the traceback when debugging); returns the exit code."""
    stream = stream or sys.stderr
    debug = debug_enabled() if debug is None else debug
    code, message = describe(exc)
    rank, world = _rank()
    if world > 1:
        if not debug and not _first_on_node():
            return code
        message = f"[rank {rank}] {message}"
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    print(message, file=stream, flush=True)
    return code


def read_utf8(path: str | Path, what: str, error: type[Exception] = UserError) -> str:
    """The text of `path`; a file that is not UTF-8 raises `error` naming the file, line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{what} {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte column {col}). "
                    "Fix: save the file as UTF-8") from None


def check_writable_dir(path: str | Path, setting: str) -> Path:
    """Creates `path` if needed and checks a file can be written in it, naming `setting`."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".spark_mcore-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise OutputError(f"{setting}={path}: cannot write there ({reason}). "
                          f"Fix: set {setting} to a writable directory") from None
    return p


def check_writable_file(path: str | Path, setting: str) -> Path:
    """Checks that `path` can be created (its folder is made and probed), naming `setting`."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{setting} {path} is a directory. Fix: give a file path, e.g. {p / 'out.json'}")
    check_writable_dir(p.parent if str(p.parent) else Path("."), setting)
    return p


__all__ = ["UserError", "CheckpointError", "OutputError", "DiskFullError", "Interrupted", "SignalExit", "describe",
           "report", "debug_enabled", "read_utf8", "check_writable_dir", "check_writable_file", "DEBUG_ENV"]
