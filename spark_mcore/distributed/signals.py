"""Stop on a signal at the next step boundary: the loop finishes its step, saves, and exits.

SIGTERM (what SLURM, Kubernetes and torchrun send first), SIGINT (Ctrl-C) and any signal named
in `checkpoint.save_on_signal` (e.g. SIGUSR1 for SLURM's `--signal=USR1@120` warning before
the time limit) only set a flag. The training loop asks `StopOnSignal.should_stop()` after each
step; every rank joins that question (one all-reduce of a flag), so all ranks stop after the
same step even when only one got the signal. A second signal stops at once: it raises
`SignalExit` (a KeyboardInterrupt, so `finally` blocks still stop helper processes) without
saving.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

import torch

from spark_mcore.errors import SignalExit

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def signal_number(name: str) -> int:
    """`signal.SIGTERM` for "SIGTERM" or "TERM"; ValueError naming the valid kind of name."""
    full = name if name.upper().startswith("SIG") else f"SIG{name}"
    num = getattr(signal, full.upper(), None)
    if not isinstance(num, signal.Signals) or full.upper() in UNCATCHABLE:
        raise ValueError(f"{name!r} is not a signal this process can catch (e.g. SIGTERM, SIGINT, SIGUSR1)")
    return int(num)


def _say(msg: str) -> None:
    """os.write to stderr's descriptor: print() from a handler can re-enter a busy buffer."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stream (e.g. a test's capture)
        sys.stderr.write(msg)
        return
    os.write(fd, msg.encode())


class StopOnSignal:
    """Context manager: installs the handlers for `names` and restores the previous ones.

    `requested` is the name of the first signal received (None before); `should_stop()` is
    the collective decision. Handlers can only be installed in the main thread; elsewhere (a
    test runner's worker thread) the manager does nothing."""

    def __init__(self, names: list[str], announce: bool = True) -> None:
        self.signums = [signal_number(n) for n in names]
        self.announce = announce
        self.requested: str | None = None
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise SignalExit(name, signum)
        self.requested, self.signum = name, signum
        if self.announce:
            _say(f"{name} received: finishing the current step, then saving a checkpoint (none in the warm start; "
                 "send it again to stop at once without saving)\n")

    def __enter__(self) -> StopOnSignal:
        try:
            for num in self.signums:
                self._previous[num] = signal.signal(num, self._handle)
        except ValueError:  # not the main thread
            self._restore()
        return self

    def _restore(self) -> None:
        for num, previous in self._previous.items():
            signal.signal(num, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def should_stop(self, group: Any = None) -> bool:
        """Collective when torch.distributed is initialised: True on every rank if any rank
        received a signal."""
        flag = self.requested is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size(group) > 1:
            nccl = torch.distributed.get_backend(group) == "nccl"
            t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                             device=torch.cuda.current_device() if nccl else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
            if t.item() and not flag:
                self.requested, self.signum = "SIGTERM (on another rank)", int(signal.SIGTERM)
            return bool(t.item())
        return flag


__all__ = ["StopOnSignal", "signal_number", "UNCATCHABLE"]
