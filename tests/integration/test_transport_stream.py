"""The rollout stream across two processes on real TCP sockets: a producer process, the consumer here.

Checks that the credit window holds across processes (the producer blocks at exactly
consumed + window messages), that stale groups are dropped and counted, and that malformed
frames from another peer are rejected without losing good messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from spark_mcore.transport.stream import RolloutConsumer, StreamBatch

REPO = Path(__file__).resolve().parents[2]
WINDOW = 2
# policy_version of each message; the consumer is at version 3 with max_staleness 1, so
# message 2 (version 1) is stale and everything else (versions >= 2) is kept.
VERSIONS = [3, 3, 1, 3, 2, 3]

PRODUCER = textwrap.dedent("""
    import sys, msgpack, zmq
    from spark_mcore.transport.stream import BackPressureTimeout, RolloutProducer
    from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

    endpoint, versions = sys.argv[1], [int(v) for v in sys.argv[2].split(",")]
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 2000)
    raw.connect(endpoint)
    raw.send_multipart([b"\\xc1 garbage"])
    raw.send_multipart([msgpack.packb({"v": 1, "type": "groups", "meta": {}, "tensors": [["t", "int8", [4], 1]]})])
    producer = RolloutProducer(endpoint, high_water_mark=4, send_timeout_ms=15000, producer_id="proc")
    for i, v in enumerate(versions):
        p = Prompt(id=f"g{i}", messages=[{"role": "user", "content": str(i)}], answer=str(i))
        r = Rollout(prompt=p, prompt_ids=[i], completion=Completion([i, i + 1], str(i), [-0.5, -1.0]), reward=1.0,
                    policy_version=v)
        said = False
        while True:  # short timeouts: say once that message i waits for credit, then keep waiting
            try:
                producer.send_groups([RolloutGroup(prompt=p, rollouts=[r])], policy_version=v, timeout_ms=100)
                break
            except BackPressureTimeout:
                if not said:
                    print(f"blocked {i}", flush=True)
                    said = True
        print(f"sent {i}", flush=True)
    producer.close()
    raw.close()
    ctx.term()
    print("done", flush=True)
""")


def _reader(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.strip())


def _collect(consumer: RolloutConsumer, into: StreamBatch, max_messages: int = 64) -> None:
    b = consumer.recv(timeout_ms=50, max_messages=max_messages)
    into.groups += b.groups
    into.group_versions += b.group_versions


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_two_process_stream_back_pressure_staleness_and_malformed_frames() -> None:
    consumer = RolloutConsumer("tcp://127.0.0.1:0", max_staleness=1, credits_per_producer=WINDOW, policy_version=3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, consumer.endpoint, ",".join(map(str, VERSIONS))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    got = StreamBatch()
    try:
        # Serve control traffic until the producer has said hello (credits go out in recv). One data
        # message per recv: a fast producer could otherwise send everything and say goodbye inside a
        # single recv (credits are returned while it drains), and the hello would never be seen.
        _wait(lambda: _collect(consumer, got, max_messages=1) or consumer.num_producers == 1, 90,
              f"producer hello; output {lines}")
        consumed = consumer.stats.messages
        # Stop reading: the producer can send only what has been granted, then must block on the
        # next message (it says so). A producer that sent more would never block on that one.
        granted = min(len(VERSIONS), consumed + WINDOW)
        _wait(lambda: f"blocked {granted}" in lines, 60, f"the producer to block on message {granted}; output {lines}")
        assert sum(ln.startswith("sent") for ln in lines) == granted, (lines, consumed)
        assert "done" not in lines
        _wait(lambda: _collect(consumer, got) or ("done" in lines and consumer.stats.malformed == 2
                                                  and len(got.groups) == 5), 60, f"all messages; output {lines}")
        assert proc.wait(timeout=10) == 0, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        consumer.close()
    assert [g.prompt.id for g in got.groups] == ["g0", "g1", "g3", "g4", "g5"]
    assert got.group_versions == [3, 3, 3, 2, 3]
    assert got.groups[3].rollouts[0].completion.token_ids == [4, 5]
    assert got.groups[3].rollouts[0].completion.logprobs == [-0.5, -1.0]
    assert consumer.stats.dropped_stale == 1 and consumer.stats.messages == 6 and consumer.stats.malformed == 2
