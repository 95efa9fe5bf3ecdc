"""Verifier worker process: `python -m spark_mcore.rewards._worker`, started by `VerifierPool`.

Protocol on stdin/stdout, frames as in `_wire.py`:
  parent -> worker  hello  {"sys_path": [...], "modules": [...], "timeout_s": float}
  worker -> parent  {"ready": true}  or  {"error": "<traceback>"} and exit 1
  parent -> worker  {"name": str, "response": str, "answer": str}      (repeated)
  worker -> parent  {"reward": float, "status": "ok" | "timeout" | "error"}
EOF on stdin ends the worker. The worker applies the signal timeout itself (cheap, keeps the
process); the parent kills it when even that does not answer in time (C-level hangs).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from typing import IO, Any

from spark_mcore.rewards._wire import encode_frame, read_frame


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies, even mid C call (stdin EOF only helps
    an idle worker). Note it fires when the *thread* that started the worker exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _setup(hello: dict[str, Any]) -> float:
    for entry in hello["sys_path"]:
        if entry not in sys.path:
            sys.path.append(entry)
    importlib.import_module("spark_mcore.rewards")
    for module in hello["modules"]:
        importlib.import_module(module)
    from spark_mcore.rewards.math_verifier import warm_up

    warm_up()  # before "ready": the pool starts an item's clock when it sends the item
    return float(hello["timeout_s"])


def main() -> int:
    # fd 1 is the protocol channel; stray prints from libraries must not corrupt it.
    out = os.fdopen(os.dup(1), "wb")  # buffered: write() never returns after a partial write
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    hello = read_frame(inp)
    if hello is None:
        return 0
    try:
        timeout_s = _setup(hello)
    except BaseException:
        _send(out, {"error": traceback.format_exc()})
        return 1
    from spark_mcore.rewards.timeout import run_check

    _send(out, {"ready": True})
    while (item := read_frame(inp)) is not None:
        try:
            reward, status = run_check(item["name"], item["response"], item["answer"], timeout_s)
        except Exception:  # unknown name or malformed frame: the parent validated, so a bug
            traceback.print_exc()
            reward, status = 0.0, "error"
        _send(out, {"reward": reward, "status": status})
    return 0


def _send(out: IO[bytes], obj: Any) -> None:
    out.write(encode_frame(obj))
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
