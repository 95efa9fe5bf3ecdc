"""The `results` message: several results that were ready together in one message. Framing errors
(a missing or truncated frame, counts that do not match the frames, a message over the size
limit) reject the whole message; a member that fails the checks of a single `result` is rejected
alone (logged with its sender) and the others are taken; workers never exceed their caps."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import torch
import zmq

from spark_mcore.config.loader import ConfigError
from spark_mcore.transport.batch import decode_results, encode_results, span
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.endpoint import StreamEndpoint
from spark_mcore.transport.protocol import (
    MAX_BATCH,
    RESULT,
    RESULTS,
    WorkItem,
    WorkResult,
    decode_result,
    result_meta,
    result_tensors,
    results_tensors,
)
from spark_mcore.transport.wire import WireError, decode_arrays
from spark_mcore.transport.worker_client import WorkerClient
from spark_mcore.types import Completion, Prompt, RewardSample


def _result(sid: str, tokens: int = 3, lp: float = -0.5) -> WorkResult:
    comps = [Completion([5 + i for i in range(tokens)], f"text {sid}", [lp] * tokens) for _ in range(2)]
    return WorkResult(sid, "w", 0, [1, 2, len(sid)], comps, [1.0, 0.0])


def _part(res: WorkResult) -> tuple[dict, dict]:
    return result_meta(res, "inc"), result_tensors(res)


def _bytes(frames: list) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]


def test_members_decode_exactly_as_single_results() -> None:
    results = [_result("a", 3), _result("bb", 0), _result("c", 5)]
    # a member with a SPARK reward task takes the checked path, its neighbours the direct one
    results[1].candidates = [RewardSample("pointwise", Prompt("j", [{"role": "user", "content": "ok?"}], "Yes",
                                                              task="judge"), source_prompt_id="bb", label="Yes")]
    frames = _bytes(encode_results([_part(r) for r in results]))
    assert len(frames) == 5, "one header + prompt ids, token ids, log-probs, texts end to end"
    msg_type, meta, arrays = decode_arrays(frames)
    assert msg_type == RESULTS and meta["sample_ids"] == ["a", "bb", "c"] and meta["counts"] == [2, 2, 2]
    assert meta["prompt_lens"] == [3, 3, 3] and meta["lengths"] == [3, 3, 0, 0, 5, 5], "one list per field"
    assert meta["text_lens"] == [6, 6, 7, 7, 6, 6] and frames[4] == b"text atext atext bbtext bbtext ctext c"
    assert meta["rewards"] == [1.0, 0.0] * 3 and meta["finish"] == ["stop"] * 6 and meta["worker"] == "w"
    members = decode_results(meta, arrays)
    for res, got in zip(results, members, strict=True):
        _, m1, a1 = decode_arrays(_bytes(encode_results([_part(res)])))
        single = decode_result(m1, a1)
        assert got.to_result() == single.to_result() == res
        assert got.meta == single.meta and type(got.texts) is type(single.texts), "same frames, not only same records"
        for name in ("prompt_ids", "token_ids", "logprobs", "texts"):
            assert np.array_equal(getattr(got, name), getattr(single, name)), name
    one = _bytes(encode_results([_part(results[0])]))
    assert decode_arrays(one)[0] == RESULT, "a batch of one is a plain result message"


def test_large_members_are_joined_off_the_thread_pool_exactly_as_small_ones() -> None:
    # 2 x 20,000 tokens per member: 40,000 elements, past the size where torch.cat would copy with
    # its thread pool (a ~10 ms stall per message on a busy host), so numpy joins them
    from spark_mcore.transport.batch import _SERIAL_ELEMENTS

    big, small = _result("big", 20_000, -0.25), _result("s", 4)
    assert 2 * 20_000 > _SERIAL_ELEMENTS
    for results in ([big, small], [small, big, small]):
        frames = _bytes(encode_results([_part(r) for r in results]))
        _, meta, arrays = decode_arrays(frames)
        assert [m.to_result() for m in decode_results(meta, arrays)] == results
        joined = np.concatenate([result_tensors(r)["token_ids"].numpy() for r in results])
        assert np.array_equal(arrays["token_ids"][1], joined) and arrays["logprobs"][1].dtype == np.float32


def test_encode_refuses_mixed_log_probs_and_oversized_batches() -> None:
    bare = _result("x")
    for c in bare.completions:
        c.logprobs = None
    with pytest.raises(WireError, match="same tensors"):
        encode_results([_part(_result("a")), _part(bare)])
    with pytest.raises(WireError, match=f"at most {MAX_BATCH}"):
        encode_results([_part(_result(f"s{i}")) for i in range(MAX_BATCH + 1)])


def _batch(n: int = 3) -> tuple[dict, list[bytes]]:
    frames = _bytes(encode_results([_part(_result(f"s{i}")) for i in range(n)]))
    return msgpack.unpackb(frames[0]), frames


def _with(header: dict, frames: list[bytes], **meta_changes) -> list[bytes]:
    h = {**header, "meta": {**header["meta"], **meta_changes}}
    return [msgpack.packb(h, use_bin_type=True), *frames[1:]]


def test_broken_framing_rejects_the_whole_message() -> None:
    header, frames = _batch()
    meta = header["meta"]
    with pytest.raises(WireError, match="tensor frames arrived"):
        decode_arrays(frames[:-1])  # truncated: a frame missing
    with pytest.raises(WireError, match="bytes"):
        decode_arrays([*frames[:2], frames[2][:7], *frames[3:]])  # truncated tensor bytes
    broken = {
        "count": _with(header, frames, counts=meta["counts"][:2]),  # 2 counts for 3 results
        "sums": _with(header, frames, lengths=[3, 3, 0, 0, 5, 6]),  # lengths do not add up to the frame
        "one": _with(header, frames, sample_ids=meta["sample_ids"][:1]),
        "negative": _with(header, frames, lengths=[-3, 9, 3, 3, 3, 3]),
        "text sums": _with(header, frames, text_lens=[6, 6, 7, 7, 6, 7]),
        "no text_lens": [msgpack.packb({**header, "meta": {k: v for k, v in meta.items() if k != "text_lens"}}),
                         *frames[1:]],
        "not a list": _with(header, frames, sample_ids={"a": 1}),
        "short column": _with(header, frames, finish=meta["finish"][:5]),  # 5 finish reasons for 6 responses
        "worker": _with(header, frames, worker=7),
        "float count": _with(header, frames, counts=[2.0, 2, 2]),
    }
    for name, bad in broken.items():
        _, m, arrays = decode_arrays(bad)
        with pytest.raises(WireError, match="results"):
            decode_results(m, arrays)
        assert name


def test_one_bad_member_is_rejected_alone() -> None:
    header, frames = _batch(3)
    meta = header["meta"]
    bad_columns = {  # a member fails one of a single result's own checks: member 1 is rejected alone
        "rewards": {"rewards": [1.0, 0.0, float("nan"), 0.0, 1.0, 0.0]},
        "policy_version": {"policy_versions": [0, -1, 0]},
        "finish": {"finish": ["stop", "stop", 3, "stop", "stop", "stop"]},
        "sample_id": {"sample_ids": ["s0", "", "s2"]},
        "gen_s": {"gen_s": [meta["gen_s"][0], "soon", meta["gen_s"][2]]},
        "reward_samples": {"reward_samples": [[], [1, 2, 3], []]},
    }
    for field_name, change in bad_columns.items():
        _, m, arrays = decode_arrays(_with(header, frames, **change))
        got = decode_results(m, arrays)
        assert isinstance(got[1], WireError) and field_name in str(got[1]), (field_name, got[1])
        assert [g.meta["sample_id"] for g in (got[0], got[2])] == ["s0", "s2"], field_name
    # a value check that fails over the whole message is redone per member to find the bad one
    lps = np.frombuffer(frames[3], dtype="<f4").copy()
    lps[6 + 2] = np.nan  # member 1's third log-prob
    _, m, arrays = decode_arrays([*frames[:3], lps.tobytes(), frames[4]])
    got = decode_results(m, arrays)
    assert [type(g).__name__ for g in got] == ["ResultFrames", "WireError", "ResultFrames"]
    assert "logprobs" in str(got[1])
    ids = np.frombuffer(frames[2], dtype="<i4").copy()
    ids[-1] = 10**6  # member 2's last token id, over max_token_id
    _, m, arrays = decode_arrays([frames[0], frames[1], ids.tobytes(), *frames[3:]])
    got = decode_results(m, arrays, max_token_id=1000)
    assert [isinstance(g, WireError) for g in got] == [False, False, True]


def test_members_must_come_from_one_incarnation() -> None:
    a, b = _part(_result("a")), _part(_result("b"))
    with pytest.raises(WireError, match="one worker incarnation"):
        encode_results([a, ({**b[0], "incarnation": "other"}, b[1])])


def _endpoint(**cfg) -> StreamEndpoint:
    ep = StreamEndpoint(StreamConfig(heartbeat_s=0.1, worker_timeout_s=5.0, **cfg))
    ep.submit([WorkItem(f"s{i}", Prompt(f"p{i}", [{"role": "user", "content": "q"}], "1"), {"n": 2}) for i in range(3)])
    return ep


def _drain(ep: StreamEndpoint, until, timeout: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, "timed out"
        got += ep.poll(20)
    return got


def test_endpoint_takes_the_good_members_and_logs_the_bad_one_with_its_sender(caplog) -> None:
    ep = _endpoint()
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(ep.endpoint)
    try:
        header, frames = _batch(3)
        gen_s = header["meta"]["gen_s"]
        peer.send_multipart(_with(header, frames, gen_s=[gen_s[0], "soon", gen_s[2]]))
        got = _drain(ep, lambda g: len(g) >= 2 and ep.stats.malformed >= 1)
        assert sorted(a.item.sample_id for a in got) == ["s0", "s2"] and ep.stats.malformed == 1
        assert ep.outstanding() == ["s1"], "the rejected member's prompt is still owed"
        logged = [r.getMessage() for r in caplog.records if "dropped a bad message" in r.getMessage()]
        assert len(logged) == 1 and "unregistered peer" in logged[0] and "results[1]" in logged[0]
        peer.send_multipart(_bytes(encode_results([_part(_result("s0")), _part(_result("s1"))])))  # s0 again
        got = _drain(ep, lambda g: len(g) >= 1 and ep.stats.duplicates >= 1)
        assert [a.item.sample_id for a in got] == ["s1"], "dedup by sample id inside a batch"
    finally:
        peer.close()
        ctx.term()
        ep.close()


def test_endpoint_drops_a_batch_over_the_size_limit_whole() -> None:
    ep = _endpoint(max_message_bytes=64 << 10)
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(ep.endpoint)
    try:
        # each frame is under the limit (ZeroMQ's own check is per frame), together they are over it
        frames = _bytes(encode_results([_part(_result(f"s{i}", tokens=2000)) for i in range(3)]))
        assert max(map(len, frames)) < 64 << 10 < sum(map(len, frames))
        peer.send_multipart(frames)
        got = _drain(ep, lambda g: ep.stats.malformed >= 1 or g)
        assert not got and "max_message_bytes" in ep.stats.last_error
        assert sorted(ep.outstanding()) == ["s0", "s1", "s2"]
    finally:
        peer.close()
        ctx.term()
        ep.close()


@pytest.fixture
def router() -> Iterator[zmq.Socket]:
    """A ROUTER on a free loopback port, standing in for the trainer's endpoint."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def _received_ids(router: zmq.Socket, want: int, max_bytes: int | None = None) -> tuple[list[str], list[int]]:
    """(sample ids in arrival order, members per message) of the next results on `router` until
    `want` ids arrived; hellos are skipped, each message is at most `max_bytes` when given."""
    seen: list[str] = []
    sizes: list[int] = []
    while len(seen) < want:
        assert router.poll(5000), f"only {seen} arrived"
        frames = router.recv_multipart()[1:]
        assert max_bytes is None or sum(map(len, frames)) <= max_bytes
        msg_type, meta, arrays = decode_arrays(frames)
        if msg_type == "hello":
            continue
        members = decode_results(meta, arrays) if msg_type == RESULTS else [decode_result(meta, arrays)]
        sizes.append(len(members))
        seen += [m.meta["sample_id"] for m in members]
    return seen, sizes


def test_worker_coalesces_within_its_caps_and_every_result_arrives_once(router: zmq.Socket) -> None:
    client = WorkerClient(router.getsockopt(zmq.LAST_ENDPOINT).decode(), "w", batch_max_results=3,
                          batch_max_bytes=20_000, max_message_bytes=1 << 20)
    try:
        small = [_result(f"a{i}") for i in range(7)]
        big = [_result(f"b{i}", tokens=1000) for i in range(3)]  # ~16 kB of tensors each
        client.send_results(small + big)
        seen, sizes = _received_ids(router, 10)
        assert seen == [r.sample_id for r in small + big], "in order, each once"
        assert sizes == [3, 3, 2, 1, 1], "at most 3 per message; the byte cap splits the large ones"
        assert set(client.unacked) == set(seen), "kept until acknowledged"
    finally:
        client.close()


def test_a_large_result_shares_a_message_only_when_its_arrays_need_no_copy(router: zmq.Socket) -> None:
    # joining a large result's arrays would cost more than the message it saves: it goes alone,
    # unless `send_results` converted the batch end to end (then the join is a view)
    client = WorkerClient(router.getsockopt(zmq.LAST_ENDPOINT).decode(), "w", batch_max_results=8,
                          batch_max_bytes=1 << 20, batch_alone_bytes=10_000, max_message_bytes=1 << 20)
    try:
        rs = [_result("a0"), _result("a1"), _result("b0", tokens=1000), _result("a2"), _result("a3")]  # b0: ~16 kB
        client.send_parts([(r.sample_id, result_meta(r, client.incarnation), result_tensors(r)) for r in rs])
        seen, sizes = _received_ids(router, 5)
        assert seen == ["a0", "a1", "b0", "a2", "a3"], "in order, each once"
        assert sizes == [2, 1, 2], "separate arrays: the small ones before and after it still share messages"
        for r in rs:
            r.sample_id += "'"
        client.send_results(rs)
        seen, sizes = _received_ids(router, 5)
        assert seen == [r.sample_id for r in rs] and sizes == [5], "end to end: one message"
    finally:
        client.close()
    with pytest.raises(ConfigError, match="batch_alone_bytes"):
        StreamConfig(batch_alone_bytes=0)


def test_results_tensors_are_views_end_to_end_and_equal_to_one_by_one() -> None:
    rs = [_result("a0"), _result("b0", tokens=300), _result("a1")]
    rs[1].completions[0].text = "\u00e9t\u00e9 \U0001F600"  # multi-byte UTF-8 in the middle
    rs[2].completions[0].token_ids = []  # an empty response
    rs[2].completions[0].logprobs = []
    joined, alone = results_tensors(rs), [result_tensors(r) for r in rs]
    for a, b in zip(joined, alone, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in joined[0]:
        column = span([t[name] for t in joined])
        assert column is not None, name
        assert column.data_ptr() == joined[0][name].data_ptr()
        assert torch.equal(column, torch.cat([t[name] for t in alone]))
    assert span([alone[0]["token_ids"], alone[1]["token_ids"]]) is None, "separate arrays are copied"
    parts = [(result_meta(r, "inc"), t) for r, t in zip(rs, joined, strict=True)]
    copied = [(result_meta(r, "inc"), t) for r, t in zip(rs, alone, strict=True)]
    assert [bytes(memoryview(f)) for f in encode_results(parts)] == [bytes(memoryview(f)) for f in encode_results(copied)]


def test_a_batch_never_exceeds_max_message_bytes(router: zmq.Socket) -> None:
    # texts far longer than the estimate expects (4-byte characters): the encoded batch is split
    results = [_result(f"t{i}") for i in range(4)]
    for r in results:
        for c in r.completions:
            c.text = "\U0001F600" * 3000
    client = WorkerClient(router.getsockopt(zmq.LAST_ENDPOINT).decode(), "w", max_message_bytes=30_000)
    try:
        client.send_results(results)
        seen, _ = _received_ids(router, 4, max_bytes=30_000)
        assert seen == ["t0", "t1", "t2", "t3"]
    finally:
        client.close()


def test_a_result_over_max_message_bytes_fails_loudly_at_the_worker(router: zmq.Socket) -> None:
    """One result over the limit can never be taken: before, ZeroMQ dropped the worker's
    connection, the worker reconnected still holding it, and the trainer waited for it until its
    stall timeout. Now the worker refuses to send it and names the setting to change; the results
    before it in the same hand-over still go out."""
    from spark_mcore.transport.worker_client import ResultTooLarge

    client = WorkerClient(router.getsockopt(zmq.LAST_ENDPOINT).decode(), "w", max_message_bytes=30_000)
    try:
        with pytest.raises(ResultTooLarge, match=r"'big' is \d+ bytes, over the trainer.s transport.max_message_bytes=30000"):
            client.send_results([_result("small"), _result("big", tokens=3000)])
        assert _received_ids(router, 1, max_bytes=30_000)[0] == ["small"]
    finally:
        client.close()


def test_batch_caps_are_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match="batch_max_bytes"):
        StreamConfig(batch_max_bytes=0)
    with pytest.raises(ConfigError, match="batch_max_results"):
        StreamConfig(batch_max_results=0)
    with pytest.raises(ConfigError, match="batch_max_results"):
        StreamConfig(batch_max_results=MAX_BATCH + 1)
