"""One verifier call with a time limit, in this process.

The limit is a SIGALRM interval timer (`setitimer`), so it:
- works only in the main thread of the main interpreter, on POSIX. Elsewhere (a worker thread,
  Windows) `time_limit` runs the check *without* a limit and logs a warning once: use
  `VerifierPool` with `num_workers > 0`, whose worker processes are killed when they overrun.
- interrupts Python code only. A single long C call (a Python big-int power such as
  `9**(9**9)`) finishes before the handler can run; math_verifier.py refuses such expressions
  up front, and the worker pool kills what still slips through.
The timeout is raised as `CheckTimeout`, a BaseException, so that libraries that swallow every
`Exception` (math-verify does, with raise_on_error=False) cannot eat it and keep running.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from spark_mcore.rewards.registry import get_verifier

logger = logging.getLogger(__name__)

CheckStatus = Literal["ok", "timeout", "error"]
_warned_no_signal = False


class CheckTimeout(BaseException):
    """A verifier call ran past its time limit."""


def signal_timeout_available() -> bool:
    """True when `time_limit` can enforce its limit here (POSIX, main thread)."""
    return (
        os.name == "posix"
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )


@contextmanager
def time_limit(seconds: float) -> Iterator[bool]:
    """Raise `CheckTimeout` in the body after `seconds` of wall time; yields whether the limit
    is enforced (see the module docstring for when it is not). An interval timer that was
    already armed (an outer limit) is restored afterwards, minus the time spent here."""
    if not signal_timeout_available():
        _warn_unenforced()
        yield False
        return

    def _raise(signum: int, frame: object) -> None:
        raise CheckTimeout(f"verifier call exceeded {seconds:.3g} s")

    old_handler = signal.signal(signal.SIGALRM, _raise)
    old_delay, _old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        remaining = 0.0
        try:
            remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0]
        finally:
            # Nested so that an alarm landing in this very block still restores the handler.
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay > 0:
                # The outer timer's deadline stays where it was; fire it now if already due.
                spent = seconds - remaining
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - spent, 1e-3))


def _warn_unenforced() -> None:
    global _warned_no_signal
    if not _warned_no_signal:
        _warned_no_signal = True
        logger.warning(
            "verifier timeouts are not enforced outside the main thread; a hanging check blocks "
            "this thread. Set reward.num_workers > 0 to verify in killable worker processes."
        )


def run_check(name: str, response: str, answer: str, timeout_s: float) -> tuple[float, CheckStatus]:
    """Score one item with verifier `name` within `timeout_s` seconds (when enforceable).

    Returns (reward, status): status "timeout" or "error" (it raised, or returned something that
    is not a finite number in [0, 1]) come with reward 0.0. Unknown `name` raises KeyError: that is
    a configuration error, not a bad response.
    """
    verifier = get_verifier(name)
    try:
        with time_limit(timeout_s):
            value = verifier(response, answer)
    except CheckTimeout:
        return 0.0, "timeout"
    except Exception:
        logger.debug("verifier %r raised", name, exc_info=True)
        return 0.0, "error"
    return _checked_value(name, value)


def _checked_value(name: str, value: object) -> tuple[float, CheckStatus]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        logger.warning("verifier %r returned %s, not a float; scored 0", name, type(value).__name__)
        return 0.0, "error"
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        logger.warning("verifier %r returned %r, outside [0, 1]; scored 0", name, value)
        return 0.0, "error"
    return value, "ok"
