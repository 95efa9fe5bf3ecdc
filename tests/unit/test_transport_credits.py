"""Credit-based stream in one process: delivery, exact back-pressure, staleness, malformed input."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgpack
import pytest
import zmq

from spark_mcore.transport.stream import BackPressureTimeout, RolloutConsumer, RolloutProducer, StreamBatch
from spark_mcore.transport.wire import encode
from spark_mcore.types import Completion, Prompt, RewardSample, Rollout, RolloutGroup


def _group(pid: str, version: int = 0) -> RolloutGroup:
    p = Prompt(id=pid, messages=[{"role": "user", "content": pid}], answer="1")
    r = Rollout(prompt=p, prompt_ids=[1], completion=Completion([2, 3], "1", [-0.1, -0.2]), reward=1.0,
                policy_version=version)
    return RolloutGroup(prompt=p, rollouts=[r])


def _until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def pair() -> Iterator[tuple[RolloutConsumer, RolloutProducer]]:
    consumer = RolloutConsumer("tcp://127.0.0.1:0", credits_per_producer=2, max_staleness=1, policy_version=5)
    producer = RolloutProducer(consumer.endpoint, high_water_mark=8, send_timeout_ms=2000, producer_id="w0")
    try:
        _until(lambda: len(consumer.recv(timeout_ms=20)) == 0 and consumer.num_producers == 1)
        _until(lambda: producer.credits == 2)
        yield consumer, producer
    finally:
        producer.close()
        consumer.close()


def _drain(consumer: RolloutConsumer, n_records: int) -> StreamBatch:
    out = StreamBatch()
    deadline = time.monotonic() + 5
    while len(out) < n_records and time.monotonic() < deadline:
        b = consumer.recv(timeout_ms=50)
        out.groups += b.groups
        out.group_versions += b.group_versions
        out.reward_samples += b.reward_samples
        out.reward_versions += b.reward_versions
    return out


def test_binds_random_port_and_reports_it() -> None:
    with RolloutConsumer("tcp://127.0.0.1:0") as c:
        host, port = c.endpoint.rsplit(":", 1)
        assert host == "tcp://127.0.0.1" and int(port) > 0
        with pytest.raises(ValueError, match=r"endpoint: cannot bind 'tcp://127\.0\.0\.1:\d+'"):
            RolloutConsumer(c.endpoint)  # port already taken
    with pytest.raises(ValueError, match="endpoint: expected a ZeroMQ address"):
        RolloutConsumer("127.0.0.1:5")
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutConsumer(max_staleness=-1)


def test_groups_and_reward_samples_arrive_in_order(pair: tuple[RolloutConsumer, RolloutProducer]) -> None:
    consumer, producer = pair
    sample = RewardSample("pointwise", Prompt("j0", [{"role": "user", "content": "ok?"}], "Yes", task="judge"),
                          source_prompt_id="g0", label="Yes")
    producer.send_groups([_group("g0", 5), _group("g1", 5)], policy_version=5)
    producer.send_reward_samples([sample], policy_version=4)
    got = _drain(consumer, 3)
    assert [g.prompt.id for g in got.groups] == ["g0", "g1"]
    assert got.groups[0] == _group("g0", 5)
    assert got.group_versions == [5, 5]
    assert got.reward_samples == [sample] and got.reward_versions == [4]
    assert (consumer.stats.messages, consumer.stats.groups, consumer.stats.reward_samples) == (2, 2, 1)


def test_back_pressure_is_exactly_the_credit_window(pair: tuple[RolloutConsumer, RolloutProducer]) -> None:
    consumer, producer = pair
    producer.send_groups([_group("a")], 5, timeout_ms=100)
    producer.send_groups([_group("b")], 5, timeout_ms=100)
    assert producer.credits == 0
    t0 = time.monotonic()
    with pytest.raises(BackPressureTimeout, match="no credit from the consumer"):
        producer.send_groups([_group("c")], 5, timeout_ms=150)
    assert time.monotonic() - t0 >= 0.14
    assert [g.prompt.id for g in _drain(consumer, 2).groups] == ["a", "b"]
    _until(lambda: producer.credits == 2)  # both credits came back once the trainer took the messages
    producer.send_groups([_group("c")], 5, timeout_ms=100)
    assert [g.prompt.id for g in _drain(consumer, 1).groups] == ["c"]


def test_stale_messages_are_dropped_and_counted(pair: tuple[RolloutConsumer, RolloutProducer]) -> None:
    consumer, producer = pair  # policy_version 5, max_staleness 1: versions < 4 are dropped
    producer.send_groups([_group("old1"), _group("old2")], policy_version=3)
    producer.send_groups([_group("ok4")], policy_version=4)
    got = _drain(consumer, 1)
    _until(lambda: producer.credits == 2)  # the dropped message returned its credit too
    producer.send_groups([_group("ok5")], policy_version=5)
    got.groups += _drain(consumer, 1).groups
    assert [g.prompt.id for g in got.groups] == ["ok4", "ok5"]
    assert consumer.stats.dropped_stale == 2 and consumer.stats.messages == 3
    consumer.policy_version = 7
    producer.send_groups([_group("late")], policy_version=5)
    assert len(consumer.recv(timeout_ms=300)) == 0 and consumer.stats.dropped_stale == 3


def test_malformed_frames_are_counted_and_do_not_block_good_messages(
        pair: tuple[RolloutConsumer, RolloutProducer]) -> None:
    consumer, producer = pair
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(consumer.endpoint)
    try:
        raw.send_multipart([b"\xc1not msgpack"])
        raw.send_multipart([msgpack.packb({"v": 1, "type": "groups", "meta": {}, "tensors": [["x", "int8", [4], 1]]})])
        raw.send_multipart(encode("groups", {"policy_version": 5, "records": [{"prompt": 1}]}))
        raw.send_multipart(encode("launch", {}))
        producer.send_groups([_group("good")], policy_version=5)
        got = StreamBatch()
        _until(lambda: (got.groups.extend(consumer.recv(timeout_ms=20).groups) or True)
               and consumer.stats.malformed == 4 and len(got.groups) == 1)
    finally:
        raw.close(0)
        ctx.term()
    assert [g.prompt.id for g in got.groups] == ["good"]
    assert "unknown message type 'launch'" in consumer.stats.last_error
    _until(lambda: producer.credits == 2)  # raw peers never said hello: the producer's window is intact


def test_bad_records_fail_before_spending_credit(pair: tuple[RolloutConsumer, RolloutProducer]) -> None:
    _, producer = pair
    bad = _group("x")
    bad.prompt.meta["obj"] = object()
    with pytest.raises(ValueError, match="meta: not msgpack-serialisable"):
        producer.send_groups([bad], policy_version=5)
    with pytest.raises(ValueError, match="policy_version"):
        producer.send_groups([_group("y")], policy_version=-1)
    assert producer.credits == 2


def test_two_producers_have_independent_windows() -> None:
    with RolloutConsumer(credits_per_producer=1) as consumer:
        p1 = RolloutProducer(consumer.endpoint, producer_id="p1")
        p2 = RolloutProducer(consumer.endpoint, producer_id="p2")
        try:
            _until(lambda: len(consumer.recv(timeout_ms=20)) == 0 and consumer.num_producers == 2)
            p1.send_groups([_group("from-p1")], 0, timeout_ms=1000)
            with pytest.raises(BackPressureTimeout):
                p1.send_groups([_group("again")], 0, timeout_ms=100)
            p2.send_groups([_group("from-p2")], 0, timeout_ms=1000)
            assert sorted(g.prompt.id for g in _drain(consumer, 2).groups) == ["from-p1", "from-p2"]
        finally:
            p1.close()
            p2.close()
