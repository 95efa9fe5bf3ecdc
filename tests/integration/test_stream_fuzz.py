"""Fuzzing the trainer's stream endpoint over real TCP on 127.0.0.1.

Hostile peers send truncated frames, a wrong schema version, wrong dtypes and shapes, huge
declared sizes, random bytes, a message over the size limit, forged results for prompts they
were never given, broken `results` batches (truncated, counts that do not match the frames, too
many members, over the size limit, one bad member among good ones), and a flood of junk. Each bad message is rejected (counted, logged with its
sender), the endpoint's memory stays bounded, and every sample of the honest worker arrives
exactly once.
"""

from __future__ import annotations

import random
import resource
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from spark_mcore.transport.batch import PER_RESULT, encode_results
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.endpoint import StreamEndpoint
from spark_mcore.transport.protocol import (
    RESULT,
    WorkItem,
    WorkResult,
    encode_result,
    result_meta,
    result_tensors,
)
from spark_mcore.transport.wire import SCHEMA_VERSION
from spark_mcore.transport.worker_client import WorkerClient
from spark_mcore.types import Completion, Prompt

pytestmark = pytest.mark.timeout(60)
N_ITEMS = 24
FLOOD = 5_000


def _result(sid: str, n: int = 2) -> WorkResult:
    comps = [Completion([5, 6, 7], "\\boxed{1}", [-0.1, -0.2, -0.3]) for _ in range(n)]
    return WorkResult(sid, "honest", 0, [1, 2, 3], comps, [1.0] * n)


def _honest(endpoint: str, stop: threading.Event) -> None:
    client = WorkerClient(endpoint, "honest", capacity=4, heartbeat_s=0.1)
    try:
        while not stop.is_set():
            client.send_results([_result(item.sample_id) for item in client.poll(20)])  # coalesced
    finally:
        client.close()


def _bad_messages(sid: str) -> list[list[bytes]]:
    """One of each kind of malformed message (all must be rejected)."""
    good = [bytes(f.buffer if hasattr(f, "buffer") else f) for f in encode_result(_result(sid), "x")]
    header = msgpack.unpackb(good[0])

    def with_header(**changes) -> list[bytes]:
        h = {**header, **changes}
        return [msgpack.packb(h, use_bin_type=True), *good[1:]]

    meta = header["meta"]
    table = header["tensors"]
    float_ids = [[t[0], "float32" if t[0] == "token_ids" else t[1], t[2], t[3]] for t in table]
    huge = [[t[0], t[1], [2**40] if t[0] == "token_ids" else t[2], t[3]] for t in table]
    return [
        good[:-1],  # truncated: a tensor frame missing
        [good[0], good[1], good[2][:5], *good[3:]],  # truncated tensor bytes
        [good[0][: len(good[0]) // 2]],  # truncated header
        with_header(v=SCHEMA_VERSION + 7),  # wrong version
        with_header(tensors=float_ids),  # wrong dtype (float32 token ids; same byte size)
        with_header(meta={**meta, "lengths": [3, 3, 3]}),  # shape: 3 lengths for 2 texts
        with_header(meta={**meta, "lengths": [10**12, 3]}),  # huge declared length
        with_header(tensors=huge),  # huge declared tensor shape
        with_header(meta={k: v for k, v in meta.items() if k != "rewards"}),  # required field missing
        with_header(meta={**meta, "rewards": [float("nan"), 1.0]}),  # non-finite reward
        [*good[:4], b"\xff" + good[4][1:]],  # texts that are not UTF-8
        [*good[:3], np.zeros(6, dtype="<f4").tobytes(), good[4]],  # log-probs +0.0 (the wire sends -0.0)
        with_header(meta={**meta, "text_lens": [9, 10]}),  # text lengths that do not add up to the frame
        with_header(type="exec"),  # unknown message type
        [msgpack.packb({"v": SCHEMA_VERSION, "type": RESULT, "meta": [], "tensors": []})],  # meta not a map
        [bytes(random.Random(0).randbytes(64))],  # random bytes
        [msgpack.packb(2**63)],  # msgpack of the wrong kind
        *_bad_batches(sid),
    ]


def _bad_batches(sid: str) -> list[list[bytes]]:
    """`results` messages that must each count as exactly one bad message and cost no sample."""
    def batch(*sids: str) -> list[bytes]:
        frames = encode_results([(result_meta(_result(s), "x"), result_tensors(_result(s))) for s in sids])
        return [bytes(memoryview(f)) for f in frames]

    good = batch(sid, "never-assigned-b")
    header = msgpack.unpackb(good[0])
    meta = header["meta"]

    def with_meta(**changes) -> list[bytes]:
        return [msgpack.packb({**header, "meta": {**meta, **changes}}, use_bin_type=True), *good[1:]]

    nan_member = np.frombuffer(good[3], dtype="<f4").copy()
    nan_member[0] = np.nan  # in the first member (sid): the second, a result nobody asked for, is a duplicate
    return [
        good[:-1],  # truncated batch: the log-prob frame missing
        [*good[:2], good[2][:-4], *good[3:]],  # truncated token ids
        with_meta(prompt_lens=[3, 3, 3]),  # a count that does not match the results
        with_meta(lengths=[3, 3, 3, 4]),  # lengths that do not add up to the frames
        with_meta(**{k: meta[k] * 200 for k in PER_RESULT}),  # over MAX_BATCH
        with_meta(finish=meta["finish"][:3]),  # a column one entry short
        [*good[:3], nan_member.tobytes(), good[4]],  # one bad member: rejected alone
    ]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_endpoint_rejects_bad_frames_bounded_memory_and_honest_samples_arrive(caplog) -> None:
    cfg = StreamConfig(heartbeat_s=0.1, worker_timeout_s=5.0, credits_per_worker=4, max_message_bytes=1 << 20,
                       high_water_mark=64)
    ep = StreamEndpoint(cfg)
    ep.submit([WorkItem(f"s{i}", Prompt(f"p{i}", [{"role": "user", "content": "1+0"}], "1"), {"n": 2})
               for i in range(N_ITEMS)])
    stop = threading.Event()
    honest = threading.Thread(target=_honest, args=(ep.endpoint, stop), daemon=True)
    honest.start()
    ctx = zmq.Context()
    attackers = [ctx.socket(zmq.DEALER) for _ in range(4)]
    for s in attackers:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.connect(ep.endpoint)
    accepted: dict[str, int] = {}
    try:
        for _ in range(20):  # let the honest worker register and take work first
            for a in ep.poll(20):
                accepted[a.item.sample_id] = accepted.get(a.item.sample_id, 0) + 1
        rss0 = _rss_mb()
        bad = _bad_messages("s3")  # aimed at a real sample id: must not cost the honest result
        for frames in bad:
            attackers[0].send_multipart(frames)
        forged = encode_result(_result("never-assigned"), "x")
        attackers[1].send_multipart(forged)  # a well-formed result nobody asked for
        attackers[1].send_multipart([b"\0" * (2 << 20)])  # over max_message_bytes: ZeroMQ drops the peer
        long = [Completion([5] * 30_000, "t", [-0.1] * 30_000)] * 2
        big = [(result_meta(r, "x"), result_tensors(r)) for r in (WorkResult(f"b{i}", "x", 0, [1], long, [1.0, 1.0])
                                                                  for i in range(4))]
        over = encode_results(big)  # each frame under the limit, the message over it: the endpoint drops it
        assert max(len(memoryview(f)) for f in over) < 1 << 20 < sum(len(memoryview(f)) for f in over)
        attackers[3].send_multipart(over)
        junk = random.Random(1)
        for _ in range(FLOOD):  # a flood from one sender
            attackers[2].send_multipart([junk.randbytes(junk.randrange(1, 200))], flags=zmq.NOBLOCK)
        deadline = time.monotonic() + 40
        while (len(accepted) < N_ITEMS or ep.stats.malformed < len(bad) + 1 + FLOOD * 0.5) and time.monotonic() < deadline:
            for a in ep.poll(20):
                accepted[a.item.sample_id] = accepted.get(a.item.sample_id, 0) + 1
    finally:
        stop.set()
        honest.join(timeout=5)
        for s in attackers:
            s.close()
        ctx.term()
        ep.close()
    assert sorted(accepted) == sorted(f"s{i}" for i in range(N_ITEMS)), "every honest sample arrives"
    assert set(accepted.values()) == {1}, "each exactly once"
    assert ep.stats.malformed >= len(bad) + 1 + FLOOD * 0.5
    assert "max_message_bytes" in " ".join(r.getMessage() for r in caplog.records), "the batch over the limit"
    assert ep.stats.duplicates >= 1  # the forged result was acknowledged and dropped
    assert _rss_mb() - rss0 < 64, "memory stays bounded under the flood"
    senders = {r.getMessage().split(" from ")[1].split(":")[0] for r in caplog.records if "dropped a bad message" in r.getMessage()}
    assert any(s.startswith("unregistered peer") for s in senders)
    logged = sum("dropped a bad message" in r.getMessage() for r in caplog.records)
    assert logged < 100, "logging is rate-limited per sender"
    assert np.isfinite(ep.stats.bytes_in)


def test_each_kind_of_bad_message_is_rejected_and_costs_no_sample() -> None:
    ep = StreamEndpoint(StreamConfig(heartbeat_s=0.1, worker_timeout_s=5.0))
    ep.submit([WorkItem("s3", Prompt("p3", [{"role": "user", "content": "1+0"}], "1"), {"n": 2})])
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(ep.endpoint)
    try:
        bad = _bad_messages("s3")
        for frames in bad:
            peer.send_multipart(frames)
        deadline = time.monotonic() + 20
        got = []
        while ep.stats.malformed < len(bad) and time.monotonic() < deadline:
            got += ep.poll(20)
        assert ep.stats.malformed == len(bad) and not got
        assert ep.stats.duplicates == 1, "the good member of the batch with one bad member was taken (a duplicate)"
        assert ep.outstanding() == ["s3"], "a rejected result leaves its prompt outstanding"
        peer.send_multipart(encode_result(_result("s3"), "x"))  # the real one still counts
        while not got and time.monotonic() < deadline:
            got += ep.poll(20)
        assert [a.item.sample_id for a in got] == ["s3"]
    finally:
        peer.close()
        ctx.term()
        ep.close()
