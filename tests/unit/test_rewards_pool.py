"""VerifierPool with worker processes: order, timeouts (soft and kill), crashes, no leaks.

The tests share one pool and run in file order: the ones that kill workers come last, so that
few tests wait for a replacement worker's imports.

The verifiers below are registered here and imported by the workers through
`RewardConfig.verifier_modules = [__name__]`. They behave like ordinary verifiers (1.0 when the
response equals the answer) except on the magic responses inside a worker, so that they also
pass the registry contract test in test_rewards.py when both files run in one session.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from spark_mcore.rewards import RewardConfig, VerifierPool, register_verifier

TIMEOUT_S = 1.0
# Generous, so that a worker's own timeout reports before the kill even on a loaded machine.
GRACE_S = 3.0
# Wall-clock allowance on top: these 2-core machines run heavily oversubscribed. Unbounded, the
# checks below take minutes (TOWER, SLOW_MATH) or 60 s (stall).
SLACK_S = 6.0
TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"
SLOW_MATH = "\\boxed{" + "+".join(f"\\frac{{{i}}}{{x^{{{i % 7}}}+{i}}}" for i in range(25)) + "}"


def _in_worker() -> bool:
    """True inside a pool worker (`python -m spark_mcore.rewards._worker`), never in pytest."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec is not None and spec.name == "spark_mcore.rewards._worker"


@register_verifier("test_pool_stall")
def stall_verifier(response: str, answer: str) -> float:
    """On "stall": blocks SIGALRM and sleeps, like a hang inside one C call (the worker's own
    signal timer cannot interrupt it; only the pool's kill can)."""
    if response == "stall" and _in_worker():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return float(response == answer)


@register_verifier("test_pool_crash")
def crash_verifier(response: str, answer: str) -> float:
    """On "crash": the worker process dies at once."""
    if response == "crash" and _in_worker():
        os._exit(3)
    return float(response == answer)


@register_verifier("test_pool_raise")
def raise_verifier(response: str, answer: str) -> float:
    """On "raise": raises (a contract violation the pool must absorb)."""
    if response == "raise" and _in_worker():
        raise RuntimeError("verifier bug")
    return float(response == answer)


def _cfg(workers: int = 2) -> RewardConfig:
    return RewardConfig(
        timeout_s=TIMEOUT_S, num_workers=workers, kill_grace_s=GRACE_S, verifier_modules=[__name__]
    )


SEEN_PIDS: set[int] = set()


@pytest.fixture(scope="module")
def pool() -> Iterator[VerifierPool]:
    """One pool shared by the module (worker start-up costs seconds on loaded machines)."""
    with VerifierPool(_cfg()) as p:
        p.wait_ready()
        yield p


@pytest.fixture(autouse=True)
def _record_worker_pids(request: pytest.FixtureRequest) -> Iterator[None]:
    if "pool" not in request.fixturenames:
        yield
        return
    shared = request.getfixturevalue("pool")
    SEEN_PIDS.update(shared.worker_pids())
    yield
    SEEN_PIDS.update(shared.worker_pids())


def _delta(pool: VerifierPool, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in pool.stats.items()}


def test_results_come_back_in_order_and_match_in_process(pool: VerifierPool) -> None:
    items = [
        ("math", "\\boxed{0.5}", "\\frac{1}{2}"),
        ("math", "\\boxed{3}", "4"),
        ("judge", "\\box{Yes}", "Yes"),
        ("judge", "\\boxed{A}", "B"),
        ("choice", "\\boxed{(c)}", "C"),
        ("exact", "\\boxed{ Paris }", "paris"),
        ("math", "no box", "1"),
        ("math", "\\boxed{1,000}", "1000"),
    ] * 3
    expected = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0] * 3
    before = dict(pool.stats)
    assert pool.score(items) == expected
    assert _delta(pool, before) == {"items": 24, "timeouts": 0, "errors": 0, "worker_restarts": 0}
    with VerifierPool(RewardConfig(num_workers=0)) as local:
        assert local.score(items) == expected
    assert pool.score([]) == []


def test_unusual_strings_cross_the_pipe_intact(pool: VerifierPool) -> None:
    items = [
        ("exact", "\\boxed{\ud800 日本 🚀}", "\ud800 日本 🚀"),  # lone surrogate survives JSON
        ("math", "x" * 1_000_000 + "\\boxed{7}", "7"),  # many partial pipe reads
        ("exact", "\\boxed{\x00}", "\x00"),
    ]
    assert pool.score(items) == [1.0, 1.0, 1.0]


def test_power_tower_scores_zero_within_the_timeout(pool: VerifierPool) -> None:
    pool.wait_ready()
    start = time.monotonic()
    assert pool.score([("math", TOWER, "1"), ("math", "\\boxed{2}", "2")]) == [0.0, 1.0]
    assert time.monotonic() - start < TIMEOUT_S + GRACE_S + SLACK_S


def test_slow_sympy_times_out_inside_the_worker_without_a_restart(pool: VerifierPool) -> None:
    pool.wait_ready()
    pids, before = pool.worker_pids(), dict(pool.stats)
    start = time.monotonic()
    assert pool.score([("math", SLOW_MATH, "1"), ("math", "\\boxed{2}", "2")]) == [0.0, 1.0]
    assert time.monotonic() - start < TIMEOUT_S + GRACE_S + SLACK_S
    assert _delta(pool, before) == {"items": 2, "timeouts": 1, "errors": 0, "worker_restarts": 0}
    assert pool.worker_pids() == pids


def test_items_are_validated_before_any_work(pool: VerifierPool) -> None:
    with pytest.raises(KeyError, match="unknown verifier 'nope'"):
        pool.score([("math", "\\boxed{1}", "1"), ("nope", "a", "b")])
    with pytest.raises(TypeError, match=r"items\[0\]\.response: expected str"):
        pool.score([("math", None, "1")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"items\[1\]: expected a \(verifier_name"):
        pool.score([("math", "a", "b"), ("math", "a")])  # type: ignore[list-item]


def test_bad_verifier_module_fails_at_construction() -> None:
    cfg = RewardConfig(num_workers=1, verifier_modules=["no_such_module_for_spark_tests"])
    with pytest.raises(ImportError, match="reward.verifier_modules"):
        VerifierPool(cfg)


def test_context_manager_closes_workers_still_starting() -> None:
    start = time.monotonic()
    with VerifierPool(_cfg(workers=2)) as fresh:
        pids = fresh.worker_pids()  # still importing: close kills them without waiting
    assert len(pids) == 2 and not any(psutil.pid_exists(pid) for pid in pids)
    assert time.monotonic() - start < SLACK_S


def test_an_interrupted_score_leaves_no_stale_answer_behind(
    pool: VerifierPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_time, reap_overdue = pool._wait_time, pool._reap_overdue

    def interrupt_once_busy(rewards: list[float]) -> None:  # Ctrl-C while an item is in flight
        if pool.stats["items"] and any(w.index is not None for w in pool._workers):
            raise KeyboardInterrupt
        reap_overdue(rewards)

    monkeypatch.setattr(pool, "_wait_time", lambda: min(wait_time(), 0.05))
    monkeypatch.setattr(pool, "_reap_overdue", interrupt_once_busy)
    pids = pool.worker_pids()
    with pytest.raises(KeyboardInterrupt):
        pool.score([("test_pool_stall", "stall", "x")])
    monkeypatch.undo()
    assert len(set(pids) - set(pool.worker_pids())) == 1  # the busy one was replaced
    assert pool.score([("math", "\\boxed{1}", "1"), ("math", "\\boxed{3}", "2")]) == [1.0, 0.0]


def test_a_stuck_worker_is_killed_and_replaced(pool: VerifierPool) -> None:
    pids, before = pool.worker_pids(), dict(pool.stats)
    start = time.monotonic()  # one worker is ready: both items run on it, "ok" first
    rewards = pool.score([("test_pool_stall", "ok", "ok"), ("test_pool_stall", "stall", "x")])
    assert rewards == [1.0, 0.0]
    assert time.monotonic() - start >= TIMEOUT_S + GRACE_S  # the soft timer could not end it
    assert time.monotonic() - start < TIMEOUT_S + GRACE_S + SLACK_S
    assert _delta(pool, before) == {"items": 2, "timeouts": 1, "errors": 0, "worker_restarts": 1}
    gone = set(pids) - set(pool.worker_pids())
    assert len(gone) == 1 and not psutil.pid_exists(gone.pop())  # killed and reaped
    assert len(pool.worker_pids()) == 2
    assert pool.score([("math", "\\boxed{5}", "5")] * 4) == [1.0] * 4


def test_crashes_and_exceptions_score_zero_and_are_counted(pool: VerifierPool) -> None:
    before = dict(pool.stats)
    items = [
        ("test_pool_raise", "raise", "x"),
        ("test_pool_crash", "fine", "fine"),
        ("test_pool_raise", "fine", "fine"),
        ("test_pool_crash", "crash", "x"),  # last: no item waits for the replacement's imports
    ]
    assert pool.score(items) == [0.0, 1.0, 1.0, 0.0]
    assert _delta(pool, before) == {"items": 4, "timeouts": 0, "errors": 2, "worker_restarts": 1}


def test_close_leaves_no_processes_behind(pool: VerifierPool) -> None:
    """Runs last on the shared pool: every worker it ever ran (including the killed and
    crashed ones replaced above) must be gone after close()."""
    assert len(SEEN_PIDS) >= 4  # two originals + the stalled and the crashed ones' replacements
    assert {p.pid for p in psutil.Process().children(recursive=True)} >= set(pool.worker_pids())
    pool.close()
    pool.close()  # idempotent
    assert pool.worker_pids() == []
    assert not any(psutil.pid_exists(pid) for pid in SEEN_PIDS)
    assert not {p.pid for p in psutil.Process().children(recursive=True)} & SEEN_PIDS
    with pytest.raises(RuntimeError, match="after close"):
        pool.score([("math", "\\boxed{1}", "1")])
