"""Wire format and record (de)serialisation: exact bytes, round trips, and every rejection path."""

from __future__ import annotations

import msgpack
import pytest
import torch

from spark_mcore.transport import records as rec
from spark_mcore.transport.wire import SCHEMA_VERSION, WireError, decode, encode, supported_dtypes
from spark_mcore.types import Completion, Prompt, RewardSample, Rollout, RolloutGroup, TrainBatch


def _header(frames: list) -> dict:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def _reframe(header: dict, *tensor_frames: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *tensor_frames]


def test_layout_is_header_then_little_endian_raw_frames() -> None:
    frames = encode("t", {"k": [1, "x"]}, {"a": torch.tensor([1, 2], dtype=torch.int32),
                                          "b": torch.tensor([1.0], dtype=torch.bfloat16)})
    assert len(frames) == 3
    assert _header(frames) == {"v": SCHEMA_VERSION, "type": "t", "meta": {"k": [1, "x"]},
                               "tensors": [["a", "int32", [2], 1], ["b", "bfloat16", [1], 2]]}
    assert bytes(frames[1]) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
    assert bytes(frames[2]) == b"\x80\x3f"  # bf16 1.0 = 0x3F80, little-endian


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_roundtrip_every_dtype_exactly(dtype: torch.dtype) -> None:
    src = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.float64)
    t = (src % 2 == 1) if dtype == torch.bool else (src * 0.5 if dtype.is_floating_point else src).to(dtype)
    msg_type, meta, tensors = decode(encode("m", {}, {"x": t}))
    assert (msg_type, meta) == ("m", {})
    assert tensors["x"].dtype == dtype and tensors["x"].shape == (2, 3)
    assert torch.equal(tensors["x"], t)


def test_bf16_keeps_bits_and_non_contiguous_and_scalar_and_empty() -> None:
    bf = torch.tensor([3.140625, -0.0078125, 65280.0], dtype=torch.bfloat16)
    strided = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()  # not contiguous
    scalar = torch.tensor(7.5)
    empty = torch.zeros(0, 4, dtype=torch.float32)
    _, _, out = decode(encode("m", {}, {"bf": bf, "s": strided, "c": scalar, "e": empty}))
    assert torch.equal(out["bf"].view(torch.int16), bf.view(torch.int16))
    assert out["s"].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert out["c"].shape == () and out["c"].item() == 7.5
    assert out["e"].shape == (0, 4)
    out["s"][0, 0] = 42  # decoded tensors own writable memory
    assert out["s"][0, 0].item() == 42


def test_decode_accepts_zmq_frames_and_memoryviews() -> None:
    frames = [memoryview(bytes(f)) for f in encode("m", {"a": 1}, {"x": torch.tensor([5], dtype=torch.int16)})]
    assert decode(frames)[2]["x"].tolist() == [5]


def test_unknown_schema_version_names_field() -> None:
    frames = encode("m", {}, {})
    h = _header(frames)
    h["v"] = 99
    with pytest.raises(WireError, match=r"header\.v: schema version 99"):
        decode(_reframe(h))


def test_missing_and_extra_frames() -> None:
    frames = encode("m", {}, {"x": torch.ones(2)})
    with pytest.raises(WireError, match=r"frames: header lists 1 tensors but 0 tensor frames"):
        decode(frames[:1])
    with pytest.raises(WireError, match=r"frames: header lists 1 tensors but 2 tensor frames"):
        decode([*frames, b"\x00"])


def test_byte_length_mismatch_names_tensor() -> None:
    frames = encode("m", {}, {"x": torch.ones(3, dtype=torch.float32)})
    with pytest.raises(WireError, match=r"header\.tensors\[0\]: frame 1 of 'x' has 8 bytes, but shape \[3\] x float32 needs 12"):
        decode([frames[0], bytes(frames[1])[:8]])


def test_unknown_dtype_bad_shape_bad_index_duplicate_name() -> None:
    ok = _header(encode("m", {}, {"x": torch.ones(1)}))
    cases = {
        "complex64": (r"header\.tensors\[0\]\.dtype: unknown dtype 'complex64'", ["x", "complex64", [1], 1]),
        "shape": (r"header\.tensors\[0\]\.shape", ["x", "float32", [-1], 1]),
        "index": (r"header\.tensors\[0\]\.frame_index: 5", ["x", "float32", [1], 5]),
        "entry": (r"header\.tensors\[0\]: expected \[name", ["x", "float32"]),
    }
    for pattern, entry in cases.values():
        with pytest.raises(WireError, match=pattern):
            decode(_reframe({**ok, "tensors": [entry]}, b"\x00\x00\x80\x3f"))
    dup = {**ok, "tensors": [["x", "float32", [1], 1], ["x", "float32", [1], 2]]}
    with pytest.raises(WireError, match=r"header\.tensors\[1\]\.name: duplicate tensor name 'x'"):
        decode(_reframe(dup, b"\x00\x00\x80\x3f", b"\x00\x00\x80\x3f"))
    same = {**ok, "tensors": [["x", "float32", [1], 1], ["y", "float32", [1], 1]]}
    with pytest.raises(WireError, match=r"frame 1 is claimed by two tensors"):
        decode(_reframe(same, b"\x00\x00\x80\x3f", b"\x00\x00\x80\x3f"))


def test_garbage_header_and_bad_header_fields() -> None:
    with pytest.raises(WireError, match=r"frames\[0\]: not a valid msgpack header"):
        decode([b"\xc1"])
    with pytest.raises(WireError, match=r"header: expected a msgpack map"):
        decode([msgpack.packb([1, 2])])
    with pytest.raises(WireError, match=r"header\.meta: expected a map"):
        decode(_reframe({"v": SCHEMA_VERSION, "type": "m", "meta": 3, "tensors": []}))
    with pytest.raises(WireError, match=r"header\.type"):
        decode(_reframe({"v": SCHEMA_VERSION, "type": "", "meta": {}, "tensors": []}))
    with pytest.raises(WireError, match=r"frames: expected a non-empty list"):
        decode([])


def test_encode_rejects_unsupported_values() -> None:
    with pytest.raises(WireError, match=r"tensors\['z'\]\.dtype: torch\.complex64 is not supported"):
        encode("m", {}, {"z": torch.zeros(1, dtype=torch.complex64)})
    with pytest.raises(WireError, match=r"meta: not msgpack-serialisable"):
        encode("m", {"obj": object()})
    with pytest.raises(WireError, match=r"tensors\['x'\]: expected a torch.Tensor"):
        encode("m", {}, {"x": [1, 2]})  # type: ignore[dict-item]
    assert "bfloat16" in supported_dtypes() and "complex64" not in supported_dtypes()


# --- records ------------------------------------------------------------------------------------


def _group() -> RolloutGroup:
    p = Prompt(id="p1", messages=[{"role": "user", "content": "1+1?"}], answer="2", images=["a.png"], meta={"src": "t"})
    rollouts = [Rollout(prompt=p, prompt_ids=[5, 6], completion=Completion([7, 8], "2", [-0.5, -0.25], "stop"),
                        reward=1.0, policy_version=3),
                Rollout(prompt=p, prompt_ids=[5, 6], completion=Completion([9], "3", None, "length"), reward=0.0,
                        policy_version=3)]
    return RolloutGroup(prompt=p, rollouts=rollouts)


def test_group_and_reward_sample_roundtrip_through_msgpack() -> None:
    g = _group()
    s = RewardSample(kind="pairwise", prompt=Prompt(id="j1", messages=[{"role": "user", "content": "A or B?"}],
                                                    answer="A", task="judge"), source_prompt_id="p1", label="A")
    meta = {"groups": [rec.group_to_wire(g)], "samples": [rec.reward_sample_to_wire(s)]}
    _, back, _ = decode(encode("m", meta))
    g2 = rec.group_from_wire(back["groups"][0])
    assert g2 == g and g2.rollouts[0].prompt is g2.prompt  # the prompt is sent once per group
    assert rec.reward_sample_from_wire(back["samples"][0]) == s
    r = g.rollouts[0]
    assert rec.rollout_from_wire(rec.rollout_to_wire(r)) == r


def test_record_validation_names_the_dotted_field() -> None:
    d = rec.group_to_wire(_group())
    d["rollouts"][1]["completion"]["token_ids"] = [1, "x"]
    with pytest.raises(WireError, match=r"groups\[3\]\.rollouts\[1\]\.completion\.token_ids\[1\]: expected an integer"):
        rec.group_from_wire(d, "groups[3]")
    d = rec.group_to_wire(_group())
    del d["rollouts"][0]["reward"]
    with pytest.raises(WireError, match=r"group\.rollouts\[0\]: missing field\(s\) \['reward'\]"):
        rec.group_from_wire(d)
    d = rec.group_to_wire(_group())
    d["prompt"]["extra"] = 1
    with pytest.raises(WireError, match=r"group\.prompt: unknown field\(s\) \['extra'\]"):
        rec.group_from_wire(d)
    d = rec.completion_to_wire(Completion([1, 2], "t", [-1.0, -2.0]))
    d["logprobs"] = [-1.0]
    with pytest.raises(WireError, match=r"completion\.logprobs: 1 values for 2 token_ids"):
        rec.completion_from_wire(d)
    s = rec.reward_sample_to_wire(RewardSample("pointwise", Prompt("j", [], "Yes"), "p", "Yes"))
    s["kind"] = "listwise"
    with pytest.raises(WireError, match=r"reward_sample\.kind: 'listwise' is not one of"):
        rec.reward_sample_from_wire(s)


def test_group_rejects_foreign_rollout() -> None:
    g = _group()
    g.rollouts[1].prompt = Prompt(id="other", messages=[], answer="")
    with pytest.raises(WireError, match=r"rollouts\[1\]\.prompt\.id is 'other'"):
        rec.group_to_wire(g)


def test_train_batch_roundtrip_and_shape_checks() -> None:
    b = TrainBatch(tokens=torch.tensor([[1, 2, 3], [4, 5, 0]]), loss_mask=torch.tensor([[0.0, 1, 1], [0, 1, 0]]),
                   advantages=torch.tensor([0.5, -0.5]), old_logprobs=torch.zeros(2, 3), kinds=["policy", "pairwise"])
    meta, tensors = rec.train_batch_to_wire(b)
    _, meta2, tensors2 = decode(encode("batch", meta, tensors))
    b2 = rec.train_batch_from_wire(meta2, tensors2)
    assert torch.equal(b2.tokens, b.tokens) and torch.equal(b2.loss_mask, b.loss_mask)
    assert torch.equal(b2.advantages, b.advantages) and torch.equal(b2.old_logprobs, b.old_logprobs)
    assert b2.ref_logprobs is None and b2.kinds == ["policy", "pairwise"]
    tensors2["advantages"] = torch.zeros(3)
    with pytest.raises(WireError, match=r"train_batch\.advantages: shape \[3\] != \[B\] = \[2\]"):
        rec.train_batch_from_wire(meta2, tensors2)


def test_decode_arrays_is_decode_without_torch_and_zero_copy_from_received_frames() -> None:
    import numpy as np
    import zmq

    from spark_mcore.transport.wire import decode_arrays, recv_frames, send_frames

    t = {"a": torch.arange(6, dtype=torch.int32).reshape(2, 3), "b": torch.tensor([1.0, -2.0], dtype=torch.bfloat16)}
    msg_type, meta, arrays = decode_arrays(encode("m", {"k": 1}, t))
    assert (msg_type, meta) == ("m", {"k": 1})
    assert arrays["a"][0] == "int32" and arrays["a"][1].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert arrays["b"][0] == "bfloat16" and arrays["b"][1].dtype == np.int16  # the bit pattern
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        b.connect(f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}")
        send_frames(b, encode("m", {}, {"x": torch.arange(40_000, dtype=torch.int32)}))  # > zmq.COPY_THRESHOLD
        assert a.poll(5000)
        frames = recv_frames(a)
        assert len(frames) == 2
        arr = decode_arrays(frames)[2]["x"][1]
        assert np.shares_memory(arr, np.frombuffer(frames[1].buffer, dtype=np.uint8)), "a view, not a copy"
        assert arr[-1] == 39_999 and arr.flags.writeable
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()
