"""The stream endpoint's bookkeeping in one process (real sockets on 127.0.0.1): bind-address
rules, credits, dedup by sample id, re-send after a trainer restart, re-assignment of a silent
worker's prompts, staleness, and the StreamSource's checkpoint state."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.source import StepRequest, StreamSource
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.endpoint import StreamEndpoint
from spark_mcore.transport.protocol import WorkItem, WorkResult
from spark_mcore.transport.worker_client import WorkerClient
from spark_mcore.types import Completion, Prompt

FAST = {"heartbeat_s": 0.05, "worker_timeout_s": 0.5}


def _items(n: int, prefix: str = "s") -> list[WorkItem]:
    return [WorkItem(f"{prefix}{i}", Prompt(f"p{i}", [{"role": "user", "content": "q"}], "1"), {"n": 1})
            for i in range(n)]


def _answer(client: WorkerClient) -> list[str]:
    """Answers new assignments, tagged with the policy version the worker last heard of."""
    done = []
    for item in client.poll(10):
        client.send_result(WorkResult(item.sample_id, client.worker, client.policy_version, [1],
                                      [Completion([2], "t", [-0.1])], [1.0]))
        done.append(item.sample_id)
    return done

@contextlib.contextmanager
def _served(src: StreamSource) -> Iterator[list[str]]:
    """A worker answering `src`'s assignments on a thread; yields the sample ids it answered.
    Closes the worker and `src` on exit."""
    client = WorkerClient(src.endpoint.endpoint, "w", capacity=8, heartbeat_s=0.05)
    stop = threading.Event()
    answered: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            answered.extend(_answer(client))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield answered
    finally:
        stop.set()
        t.join(timeout=5)
        client.close()
        src.close()


def _pump(ep: StreamEndpoint, clients: list[WorkerClient], until, timeout: float = 10.0, answer: bool = True) -> list:
    got, deadline = [], time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, f"timed out; endpoint workers: {ep.describe_workers()}"
        got += ep.poll(10)
        for c in clients:
            _answer(c) if answer else c.poll(5)
    return got


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://*:5555", "127.0.0.1:5555", "tcp://127.0.0.1"])
def test_bind_must_be_explicit_and_never_all_interfaces_silently(bind: str) -> None:
    with pytest.raises(ConfigError, match="transport.bind"):
        StreamConfig(bind=bind)


def test_all_interfaces_only_when_asked_and_curve_keys_go_together() -> None:
    assert StreamConfig(bind="tcp://0.0.0.0:5555", allow_all_interfaces=True).bind.endswith(":5555")
    with pytest.raises(ConfigError, match="curve_public_key"):
        StreamConfig(curve_secret_key="x" * 40)


def test_credits_bound_what_a_worker_holds_and_every_item_arrives_once() -> None:
    ep = StreamEndpoint(StreamConfig(credits_per_worker=3, **FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=8, heartbeat_s=0.05)
    try:
        ep.submit(_items(10))
        held_max = [0]

        def until(got: list) -> bool:
            held_max[0] = max(held_max[0], len(client.working))
            return len(got) == 10

        got = _pump(ep, [client], until)
        assert sorted(a.item.sample_id for a in got) == sorted(f"s{i}" for i in range(10))
        assert held_max[0] <= 3
    finally:
        client.close()
        ep.close()


def test_acks_go_in_batches_but_never_wait_longer_than_the_ack_delay() -> None:
    from spark_mcore.transport.endpoint import ACK_DELAY_S

    ep = StreamEndpoint(StreamConfig(credits_per_worker=64, **FAST))  # a batch is 32 acks
    client = WorkerClient(ep.endpoint, "w", capacity=64, heartbeat_s=0.05)
    try:
        ep.submit(_items(1))
        got = _pump(ep, [client], lambda g: len(g) == 1)
        t0 = time.monotonic()
        _pump(ep, [client], lambda g: not client.unacked, answer=False)  # one result: no batch fills
        assert time.monotonic() - t0 < ACK_DELAY_S + 2.0 and got[0].item.sample_id == "s0"
    finally:
        client.close()
        ep.close()


def test_full_queues_defer_messages_but_lose_none() -> None:
    """A queue bound of one message each way: back-to-back sends (an ack and an assignment, the
    versions of several steps, one result after another) find the queue full. Before, the
    trainer's ROUTER dropped them silently (a live worker then held prompts it never got: the run
    hung) and the worker dropped results until a reconnect that never came."""
    ep = StreamEndpoint(StreamConfig(credits_per_worker=4, high_water_mark=1, heartbeat_s=0.05, worker_timeout_s=30.0))
    client = WorkerClient(ep.endpoint, "w", capacity=4, heartbeat_s=0.05, high_water_mark=1, batch_max_results=1)
    try:
        ep.submit(_items(40))
        got, deadline, i = [], time.monotonic() + 20, 0
        while len(got) < 40:
            assert time.monotonic() < deadline, f"stuck with {len(got)} of 40: {ep.describe_workers()}"
            i += 1
            if i % 3:  # now and then one side does not look for a while
                got += ep.poll(5)
                ep.set_version(ep.policy_version + 1)
            if i % 5:
                _answer(client)
        assert sorted(a.item.sample_id for a in got) == sorted(f"s{i}" for i in range(40))
        assert ep.stats.deferred > 0 and client.deferred > 0  # both sides met a full queue
        assert ep.stats.reassigned == 0  # nothing was recovered by a timeout: nothing was lost
        _pump(ep, [client], lambda g: client.policy_version == ep.policy_version, answer=False)
        assert ep.metrics()["deferred"] == ep.stats.deferred
    finally:
        client.close()
        ep.close()


def test_a_stall_after_every_worker_left_names_them() -> None:
    ep = StreamEndpoint(StreamConfig(**FAST))
    client = WorkerClient(ep.endpoint, "w0", capacity=2, heartbeat_s=0.05)
    try:
        assert ep.describe_workers() == "no worker has connected"
        _pump(ep, [client], lambda g: "w0" in ep.workers, answer=False)
        client.close()  # says goodbye (a worker does on any exit it survives, errors included)
        _pump(ep, [], lambda g: not ep.workers)
        assert ep.describe_workers() == "no worker is connected; 'w0' said goodbye (see their logs)"
    finally:
        ep.close()


def test_assignments_split_to_fit_max_message_bytes_and_a_prompt_too_large_fails_loudly() -> None:
    """Before, an assignment over the limit made the worker's ZeroMQ drop the connection; the
    worker reconnected and the trainer sent it again: the run waited until its stall timeout."""
    from spark_mcore.transport.endpoint import PromptTooLarge

    ep = StreamEndpoint(StreamConfig(credits_per_worker=8, max_message_bytes=2000, **FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=8, heartbeat_s=0.05, max_message_bytes=2000)
    try:
        ep.submit([WorkItem(f"s{i}", Prompt(f"p{i}", [{"role": "user", "content": "q" * 300}], "1"), {"n": 1})
                   for i in range(8)])  # ~2.9 KB as one assignment
        got = _pump(ep, [client], lambda g: len(g) == 8)
        assert sorted(a.item.sample_id for a in got) == sorted(f"s{i}" for i in range(8))
        assert ep.workers["w"].seq >= 1  # several assign messages
        ep.submit([WorkItem("huge", Prompt("big", [{"role": "user", "content": "q" * 5000}], "1"), {"n": 1})])
        with pytest.raises(PromptTooLarge, match=r"prompt 'big' is \d+ bytes on the wire, over transport.max_message_bytes=2000"):
            _pump(ep, [client], lambda g: False, timeout=5)
    finally:
        client.close()
        ep.close()


def test_a_worker_that_takes_smaller_messages_than_the_trainer_stops_and_is_assigned_nothing(caplog) -> None:
    """transport.max_message_bytes set lower on a worker than on the trainer: before, the trainer
    sized assignments to its own limit and the worker's socket dropped the larger ones (the run
    waited until its stall timeout). Now each end advertises its limit and the mismatch is named."""
    from spark_mcore.transport.worker_client import LimitMismatch

    ep = StreamEndpoint(StreamConfig(credits_per_worker=4, max_message_bytes=1 << 20, **FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=4, heartbeat_s=0.05, max_message_bytes=64 << 10)
    try:
        ep.submit(_items(4))
        with caplog.at_level("WARNING"), pytest.raises(
                LimitMismatch, match=r"max_message_bytes=65536 is below the trainer's \(1048576\)"):
            _pump(ep, [client], lambda g: False, timeout=5)
        assert not ep.workers["w"].in_flight and len(ep.pending) == 4  # nothing was assigned to it
        assert "takes messages of at most 65536 bytes" in caplog.text
    finally:
        client.close()
        ep.close()


def test_a_worker_with_a_larger_limit_sizes_its_results_to_the_trainers() -> None:
    """Before, a worker whose transport.max_message_bytes was larger than the trainer's joined
    results into messages the trainer's socket refused (dropping the connection, again after
    every reconnect)."""
    from spark_mcore.transport.worker_client import ResultTooLarge

    def result(sid: str, tokens: int) -> WorkResult:  # ~9.5 bytes per token on the wire
        return WorkResult(sid, "w", 0, [1], [Completion([2] * tokens, "t" * tokens, [-0.1] * tokens)], [1.0])

    ep = StreamEndpoint(StreamConfig(credits_per_worker=4, max_message_bytes=30_000, **FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=4, heartbeat_s=0.05, max_message_bytes=1 << 20)
    try:
        ep.submit(_items(4))
        items, deadline = [], time.monotonic() + 10
        while len(items) < 4:
            assert time.monotonic() < deadline, ep.describe_workers()
            ep.poll(10)
            items += client.poll(10)
        client.send_results([result(i.sample_id, 1000) for i in items])  # ~38 KB together
        got = _pump(ep, [client], lambda g: len(g) == 4, answer=False)
        assert client.send_limit == 30_000
        assert sorted(a.item.sample_id for a in got) == sorted(i.sample_id for i in items)
        with pytest.raises(ResultTooLarge, match=r"over the trainer's transport.max_message_bytes=30000"):
            client.send_results([result("big", 5000)])
    finally:
        client.close()
        ep.close()


def test_worker_idle_time_reaches_the_step_metrics_as_the_time_since_the_last_step() -> None:
    ep = StreamEndpoint(StreamConfig(**FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=4, heartbeat_s=0.05)
    try:
        _pump(ep, [client], lambda g: "w" in ep.workers)
        assert ep.metrics()["worker_idle/w"] == 0.0
        client.idle_s = 2.5  # (run_worker sets it from its generation thread's clock)
        _pump(ep, [client], lambda g: ep.workers["w"].idle_s == 2.5)
        m = ep.metrics()
        assert m["worker_idle/w"] == m["worker_idle"] == 2.5
        assert ep.metrics()["worker_idle"] == 0.0  # nothing more since the last call
    finally:
        client.close()
        ep.close()


@pytest.mark.parametrize(("field", "value"), [("idle_s", -1.0), ("idle_s", float("nan")), ("idle_s", "x"),
                                              ("max_message_bytes", 0), ("max_message_bytes", 1.5)])
def test_worker_reports_are_validated(field: str, value: object) -> None:
    from spark_mcore.transport.protocol import check_peer
    from spark_mcore.transport.wire import WireError

    meta = {"worker": "w", "incarnation": "i", "capacity": 1, "held": [], "session": "", "seen_seq": -1,
            "max_message_bytes": 1 << 20, "idle_s": 0.0}
    assert check_peer(meta, "hello").idle_s == 0.0
    with pytest.raises(WireError, match=f"hello.meta.{field}"):
        check_peer({**meta, field: value}, "hello")


def test_two_live_workers_with_one_name_the_older_is_told_to_stop(caplog) -> None:
    """Before, each report flipped the name between the two and re-assigned the other's prompts
    ("restarted"), on every heartbeat, for the whole run."""
    from spark_mcore.transport.worker_client import WorkerRefused

    ep = StreamEndpoint(StreamConfig(credits_per_worker=4, **FAST))
    old = WorkerClient(ep.endpoint, "same", capacity=4, heartbeat_s=0.05)
    _pump(ep, [old], lambda g: "same" in ep.workers)
    new = WorkerClient(ep.endpoint, "same", capacity=4, heartbeat_s=0.05)
    live, refused, got = [old, new], [], []
    try:
        ep.submit(_items(40))
        deadline = time.monotonic() + 15
        while len(got) < 40 or not refused:
            assert time.monotonic() < deadline, (len(got), refused, ep.describe_workers())
            got += ep.poll(10)
            for c in list(live):
                try:
                    _answer(c)
                except WorkerRefused as e:
                    refused.append(str(e))
                    live.remove(c)
                    c.close()  # (its goodbye must not remove the other, which holds the name now)
        assert live == [new] and "another live worker is called 'same'" in refused[0]
        assert sorted(a.item.sample_id for a in got) == sorted(f"s{i}" for i in range(40))
        assert ep.workers["same"].incarnation == new.incarnation
        assert caplog.text.count("restarted (incarnation") <= 1  # (once, when the second one came)
        # the old connection no longer stands for the name, so its goodbye cannot remove the new one
        assert list(ep._by_identity.values()) == ["same"]
        _pump(ep, [new], lambda g: ep.workers["same"].last_seen > time.monotonic() - 0.02)
        assert "same" in ep.workers
    finally:
        for c in live:
            c.close()
        ep.close()


def test_an_idle_worker_waits_in_its_poller_instead_of_spinning() -> None:
    ep = StreamEndpoint(StreamConfig(**FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=4, heartbeat_s=5.0)
    calls = []
    real = client._poller.poll
    client._poller.poll = lambda ms: calls.append(ms) or real(ms)
    try:
        assert client.poll(50) == []
        assert 1 <= len(calls) <= 3 and all(ms >= 1 for ms in calls), calls
    finally:
        client.close()
        ep.close()


@pytest.mark.parametrize("together", [False, True], ids=["one_message_each", "one_results_message"])
def test_resent_results_after_trainer_restart_are_deduplicated(together: bool) -> None:
    ep = StreamEndpoint(StreamConfig(credits_per_worker=4, **FAST))
    client = WorkerClient(ep.endpoint, "w", capacity=4, heartbeat_s=0.05)
    try:
        ep.submit(_items(2))
        _pump(ep, [client], lambda g: client.working == {"s0", "s1"}, answer=False)
        assert _answer(client) == [] and len(client.working) == 2
        # results sent, but the trainer dies before reading them
        results = [WorkResult(sid, "w", 0, [1], [Completion([2], "t", [-0.1])], [1.0]) for sid in sorted(client.working)]
        for batch in [results] if together else [[r] for r in results]:
            client.send_results(batch)
        endpoint = ep.endpoint
        ep.close(goodbye=False)
        deadline = time.monotonic() + 10
        while True:  # the restarted trainer binds the same address; it still owes s1 (s0 was trained)
            try:
                ep = StreamEndpoint(StreamConfig(bind=endpoint, credits_per_worker=4, **FAST))
                break
            except ValueError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        ep.submit(_items(2)[1:])
        got = _pump(ep, [client], lambda g: len(g) >= 1 and not client.unacked, answer=False)
        assert [a.item.sample_id for a in got] == ["s1"], "the re-sent s1 counts once"
        assert ep.stats.duplicates == 1, "the re-sent s0 is acknowledged and dropped"
    finally:
        client.close()
        ep.close()


def test_silent_worker_loses_its_prompts_to_a_live_one(caplog) -> None:
    ep = StreamEndpoint(StreamConfig(credits_per_worker=4, **FAST))
    quiet = WorkerClient(ep.endpoint, "quiet", capacity=4, heartbeat_s=0.05)
    live = None
    try:
        ep.submit(_items(4))
        _pump(ep, [quiet], lambda g: ep.in_flight().get("quiet", 0) == 4, answer=False)
        # `quiet` is never polled again: no heartbeats, no results (a hung or unplugged worker)
        live = WorkerClient(ep.endpoint, "live", capacity=4, heartbeat_s=0.05)
        got = _pump(ep, [live], lambda g: len(g) == 4)
        assert sorted(a.item.sample_id for a in got) == [f"s{i}" for i in range(4)]
        assert ep.stats.reassigned == 4 and ep.workers["quiet"].silent
        assert any("worker 'quiet' silent" in r.getMessage() and "re-assigning 4" in r.getMessage()
                   for r in caplog.records)
    finally:
        if live is not None:
            live.close()
        quiet.close()
        ep.close()


def test_stale_results_are_dropped_and_the_prompt_reassigned() -> None:
    ep = StreamEndpoint(StreamConfig(credits_per_worker=1, **FAST), policy_version=5, max_staleness=1)
    client = WorkerClient(ep.endpoint, "w", capacity=1, heartbeat_s=0.05)
    try:
        ep.submit(_items(1))
        deadline, got, versions = time.monotonic() + 10, [], iter([3, 5])
        while not got:
            assert time.monotonic() < deadline
            got += ep.poll(10)
            for item in client.poll(10):
                client.send_result(WorkResult(item.sample_id, "w", next(versions), [1], [Completion([2], "t")], [0.0]))
        assert ep.stats.stale == 1 and got[0].frames.meta["policy_version"] == 5
        assert ep.staleness == {0: 1}
    finally:
        client.close()
        ep.close()


def test_stream_source_state_reissues_batches_in_flight() -> None:
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": "q"}], "1") for i in range(6)]
    loader = iter([prompts[0:2], prompts[2:4], prompts[4:6]])
    src = StreamSource(StreamEndpoint(StreamConfig(**FAST)), loader, max_staleness=1)
    with _served(src):
        out = src.collect(StepRequest(0, 0, True, [], SamplingParams(n=1)))
        assert [g.prompt.id for g in out.groups] == ["p0", "p1"]
        src.prefetch(True, [])  # async: the next step's batch is taken and assigned now
        state = src.state_dict()
        assert [[d["prompt"]["id"] for d in b] for b in state["batches"]] == [["p2", "p3"]]
    again = StreamSource(StreamEndpoint(StreamConfig(**FAST)), iter([prompts[4:6]]))
    again.load_state_dict(state)
    assert again.endpoint.outstanding() == [d["sample_id"] for d in state["batches"][0]]
    again.close()


@pytest.mark.skipif(not __import__("zmq").has("curve"), reason="libzmq built without CURVE")
def test_curve_keys_encrypt_and_keep_out_peers_without_the_server_key() -> None:
    import zmq

    public, secret = (k.decode() for k in zmq.curve_keypair())
    ep = StreamEndpoint(StreamConfig(curve_secret_key=secret, curve_public_key=public, **FAST))
    good = WorkerClient(ep.endpoint, "good", capacity=2, heartbeat_s=0.05, server_public_key=public)
    plain = WorkerClient(ep.endpoint, "plain", capacity=2, heartbeat_s=0.05)  # no key: the handshake fails
    try:
        ep.submit(_items(3))
        got = _pump(ep, [good, plain], lambda g: len(g) == 3)
        assert sorted(a.item.sample_id for a in got) == ["s0", "s1", "s2"]
        assert "plain" not in ep.workers
    finally:
        good.close()
        plain.close()
        ep.close()


def test_async_prefetch_starts_reward_tasks_early_and_cancels_unused_ones() -> None:
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": "q"}], "1") for i in range(8)]
    rewards = [Prompt(f"r{i}", [{"role": "user", "content": "judge"}], "Yes", task="judge") for i in range(3)]
    src = StreamSource(StreamEndpoint(StreamConfig(**FAST)), iter([prompts[0:2], prompts[2:4], prompts[4:6]]),
                       max_staleness=1)
    with _served(src) as answered:
        src.collect(StepRequest(0, 0, True, [], SamplingParams(n=1)))
        src.prefetch(False, rewards[:2])
        hinted = {p: i.sample_id for p, i in src._hinted.items()}
        deadline = time.monotonic() + 10
        while hinted["r0"] not in answered:  # generated while "training"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        out = src.collect(StepRequest(1, 1, False, [rewards[0], rewards[2]], SamplingParams(n=1)))
        assert [g.prompt.id for g in out.groups] == ["r0", "r2"]
        assert hinted["r1"] in src.endpoint.done and hinted["r1"] not in src.endpoint.items, "unused hint cancelled"
        assert answered.count(hinted["r0"]) == 1, "the prefetched group was used, not generated again"


def test_async_groups_too_old_for_the_training_step_are_generated_again() -> None:
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": "q"}], "1") for i in range(4)]
    src = StreamSource(StreamEndpoint(StreamConfig(**FAST), max_staleness=1), iter([prompts[0:2], prompts[2:4]]),
                       max_staleness=1)
    with _served(src) as answered:
        src.collect(StepRequest(0, 0, True, [], SamplingParams(n=1)))
        src.prefetch(True, [])  # made by version 0 ...
        early = [i.sample_id for i in src._batches[0]]
        deadline = time.monotonic() + 10
        while not set(early) <= set(answered):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        src.weights_pushed(1)
        src.weights_pushed(2)  # ... but trained at version 2 (a reward step came in between)
        out = src.collect(StepRequest(2, 1, True, [], SamplingParams(n=1)))
        assert [g.prompt.id for g in out.groups] == ["p2", "p3"]
        assert {r.policy_version for g in out.groups for r in g.rollouts} == {2}, "generated again"
        assert out.metrics["stream/max_staleness_seen"] == 0


@pytest.mark.parametrize(("configured", "expected"), [(0, 300), (100, 100), (10**6, 300)])
def test_the_trainer_rejects_token_ids_outside_its_vocabulary(tmp_path, configured: int, expected: int) -> None:
    """A worker whose servers run another model (a larger vocabulary) would send ids that fail
    the trainer's embedding lookup: the endpoint `spark-mcore train` builds checks them against
    the model's vocabulary (or a lower transport.max_token_id)."""
    from types import SimpleNamespace

    from spark_mcore.config.run import load_run_config
    from spark_mcore.runtime import build_source

    cfg = load_run_config(None, ["rollout.source=stream", f"transport.max_token_id={configured}"])
    src = build_source(cfg, tmp_path, SimpleNamespace(world_size=1), SimpleNamespace(loader=iter([])), vocab=300)
    try:
        assert src.endpoint.cfg.max_token_id == expected
        assert cfg.transport.max_token_id == configured  # (the run's own config is left as given)
    finally:
        src.close()
