"""A rollout worker says when it first hears from a trainer and, until then, that it waits; it
counts the time its generation waits for work (reported in heartbeats)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from spark_mcore.rollout_worker import _IdleClock, _TrainerWatch


def test_the_worker_says_it_waits_until_a_trainer_answers_then_that_it_connected(capsys) -> None:
    client = SimpleNamespace(worker="w0", session="", policy_version=0)
    watch = _TrainerWatch("tcp://127.0.0.1:5555", started=100.0)
    said = []
    for t in (105.0, 110.0, 120.0, 130.0, 189.0, 190.0, 250.0):
        watch.update(client, t)
        said.append(capsys.readouterr().out)
    waited = [(t, out) for t, out in zip((105, 110, 120, 130, 189, 190, 250), said, strict=True) if out]
    assert [t for t, _ in waited] == [110, 130, 190, 250]  # after 10, 30, 90, 150 s
    assert "no answer from a trainer at tcp://127.0.0.1:5555 for 10s" in waited[0][1]
    assert "stream_endpoint" in waited[0][1] and "curve_public_key" in waited[0][1]

    client.session, client.policy_version = "abc", 3
    watch.update(client, 260.0)
    assert "connected to the trainer (session abc, policy version 3)" in capsys.readouterr().out
    watch.update(client, 400.0)  # connected: nothing more to say
    assert capsys.readouterr().out == ""
    client.session = "def"
    watch.update(client, 401.0)
    assert "the trainer restarted (session def" in capsys.readouterr().out


def test_the_idle_clock_counts_waits_and_not_work() -> None:
    clock = _IdleClock()
    assert clock.total() == 0.0
    clock.wait()
    time.sleep(0.05)
    assert clock.total() >= 0.05  # an ongoing wait counts
    clock.work()
    done = clock.total()
    time.sleep(0.02)
    assert clock.total() == done  # working time does not
    clock.work()  # (a second `work` without a wait adds nothing)
    assert clock.total() == done
