"""Helper processes die with their parent, also when the parent is SIGKILLed.

megatron's checkpoint writer starts a spawn-context `multiprocessing.Manager` (~270 MB) on the
first save, and multiprocessing a `resource_tracker`. Killed with SIGKILL (an OOM killer, a
scheduler's hard stop), the trainer leaves both running as orphans. Python's spawn children
run `python -c "from multiprocessing.spawn import spawn_main; ..."`; `die_with_parent()`
prefixes that program with a prelude that asks the kernel (Linux `PR_SET_PDEATHSIG`) to send
SIGKILL when the parent dies, and exits at once if the parent is already gone. The resource
tracker then sees EOF on its pipe (its last writer is gone) and exits by itself.

The death signal follows the parent *thread* that started the child: start helpers from a
thread that lives as long as the process (the main thread, where saves run). Elsewhere than
Linux the prelude does nothing. The verifier pool's workers set the same flag themselves
(spark_mcore/rewards/_worker.py).
"""

from __future__ import annotations

import ctypes
import multiprocessing.spawn as mp_spawn
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
_PRELUDE = (
    "import os, signal, ctypes\n"
    "try:\n"
    f"    ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != {parent}:\n"
    "    os._exit(1)\n"
)
_original = mp_spawn.get_command_line


def _command_line(**kwds: object) -> list[str]:
    cmd = list(_original(**kwds))
    if "-c" in cmd:  # not in a frozen executable, whose command line has no program text
        i = cmd.index("-c") + 1
        cmd[i] = _PRELUDE.replace("{parent}", str(os.getpid())) + cmd[i]
    return cmd


def die_with_parent() -> None:
    """Makes every later spawn-context child of this process die with it. Idempotent."""
    if sys.platform.startswith("linux") and mp_spawn.get_command_line is not _command_line:
        mp_spawn.get_command_line = _command_line


def dies_with_this_process() -> Callable[[], None]:
    """A `subprocess` `preexec_fn`, made in the parent: the child gets SIGKILL when the parent
    thread that started it dies (the flag survives `exec`). A child whose parent died before the
    flag was set exits at once: its parent PID is then no longer this process's (init or a
    subreaper adopted it), which is why the PID is taken here, not tested against 1. SIGKILL, not
    SIGTERM: the runs of a stopped comparison are started afresh anyway."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)

    return preexec


__all__ = ["die_with_parent", "dies_with_this_process", "PR_SET_PDEATHSIG"]
