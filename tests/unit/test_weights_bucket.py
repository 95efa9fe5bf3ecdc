"""Flat bucket layout, header codecs and the streaming packer (spark_mcore.weights.bucket)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from spark_mcore.weights.bucket import (
    BucketError,
    BucketHeader,
    BufferRing,
    TensorSpec,
    iter_buckets,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)


def _named() -> list[tuple[str, torch.Tensor]]:
    return [("a", torch.arange(6, dtype=torch.float32).view(2, 3)),   # 24 bytes
            ("b", torch.tensor([1.5, -2.0], dtype=torch.float32)),     # 8 bytes
            ("c", torch.arange(4, dtype=torch.float32).view(2, 2) * 10)]  # 16 bytes


def test_layout_is_contiguous_in_order_and_round_trips_bitwise() -> None:
    header, flat = pack_bucket(_named())
    assert [(t.name, t.dtype, t.shape, t.offset) for t in header.tensors] == [
        ("a", "float32", (2, 3), 0), ("b", "float32", (2,), 24), ("c", "float32", (2, 2), 32)]
    assert header.nbytes == 48 and flat.dtype == torch.uint8 and flat.numel() == 48
    # bytes 24..31 are b's two float32 values, little-endian
    assert flat[24:32].view(torch.float32).tolist() == [1.5, -2.0]
    for (_, got), (_, want) in zip(unpack_bucket(flat, header), _named(), strict=False):
        assert torch.equal(got, want) and got.shape == want.shape


def test_wire_dtype_casts_floats_while_packing() -> None:
    x = torch.tensor([1.0, 1 / 3, 1e-8, -7.1], dtype=torch.float32)  # 8 bytes in bf16: ids stay aligned
    ids = torch.tensor([7, 8, 9, 10], dtype=torch.int32)
    header, flat = pack_bucket([("x", x), ("ids", ids)], wire_dtype=torch.bfloat16)
    assert [(t.dtype, t.offset) for t in header.tensors] == [("bfloat16", 0), ("int32", 8)]
    got = dict(unpack_bucket(flat, header))
    assert torch.equal(got["x"].view(torch.int16), x.to(torch.bfloat16).view(torch.int16))  # same rounding
    assert got["x"].dtype == torch.bfloat16 and got["ids"].tolist() == [7, 8, 9, 10]


def test_unaligned_tensor_starts_new_bucket() -> None:
    named = [("x", torch.ones(3, dtype=torch.float32)), ("i", torch.tensor([7, 8], dtype=torch.int64))]
    out = list(iter_buckets(named, bucket_bytes=1024, wire_dtype=torch.bfloat16))
    assert [[t.name for t in h.tensors] for h, _ in out] == [["x"], ["i"]]
    assert out[0][0].tensors[0].dtype == "bfloat16" and out[0][1].view(torch.bfloat16).tolist() == [1.0, 1.0, 1.0]
    assert out[1][1].view(torch.int64).tolist() == [7, 8]
    with pytest.raises(BucketError, match="unaligned"):
        pack_bucket(named, wire_dtype=torch.bfloat16)


def test_bucket_size_limit_and_oversized_tensor() -> None:
    named = _named() + [("big", torch.zeros(20, dtype=torch.float32)), ("d", torch.ones(2))]  # 80 B, 8 B
    out = [(h, f.clone()) for h, f in iter_buckets(named, bucket_bytes=40)]
    # "big" needs no copy: it goes at once, ahead of the open bucket, which "d" then joins
    assert [([t.name for t in h.tensors], h.nbytes) for h, _ in out] == [
        (["a", "b"], 32), (["big"], 80), (["c", "d"], 24)]
    assert [h.index for h, _ in out] == [0, 1, 2]
    got = {n: t for h, f in out for n, t in unpack_bucket(f, h)}
    for name, want in named:
        assert torch.equal(got[name], want)
    # cast to fp16, "big" (40 B on the wire) must be copied: it closes the open bucket instead
    cast = [h for h, _ in iter_buckets(named, bucket_bytes=24, wire_dtype=torch.float16)]
    assert [([t.name for t in h.tensors], h.nbytes) for h in cast] == [
        (["a", "b", "c"], 24), (["big"], 40), (["d"], 4)]


def test_bucket_sizes_ramp_up_from_the_first() -> None:
    named = [(f"t{i}", torch.full((4,), float(i))) for i in range(12)]  # 16 B each
    out = [(h, f.clone()) for h, f in iter_buckets(named, 64, wire_dtype=torch.bfloat16, first_bucket_bytes=8)]
    assert [h.nbytes for h, _ in out] == [8, 16, 32, 40]  # 8 B doubled per bucket, up to 64 B
    got = {n: t for h, f in out for n, t in unpack_bucket(f, h)}
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in named)
    # without a cast the first tensors fill the small first buckets by themselves: sent from their own memory
    own = list(iter_buckets(named, 64, first_bucket_bytes=8))
    assert own[0][1].data_ptr() == named[0][1].data_ptr() and own[1][1].data_ptr() == named[1][1].data_ptr()


def test_buffers_are_reused_round_robin_and_across_calls() -> None:
    named = [(f"t{i}", torch.full((3,), float(i))) for i in range(4)]  # 12 B each, one per 16 B bucket
    ring = BufferRing(16, num_buffers=2)
    ptrs = [f.data_ptr() for _, f in iter_buckets(named, bucket_bytes=16, ring=ring)]
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]
    again = [f.data_ptr() for _, f in iter_buckets(named, bucket_bytes=16, ring=ring)]
    assert set(again) == set(ptrs)  # a kept ring allocates nothing new


def test_whole_bucket_tensor_in_wire_dtype_is_not_copied() -> None:
    big = torch.arange(8, dtype=torch.float32)  # 32 B >= bucket: travels alone
    named = [("s", torch.ones(2)), ("big", big), ("t", torch.ones(2))]
    out = list(iter_buckets(named, bucket_bytes=32))
    assert [[t.name for t in h.tensors] for h, _ in out] == [["big"], ["s", "t"]]
    assert out[0][1].data_ptr() == big.data_ptr() and out[0][1].numel() == 32  # its own memory
    cast = list(iter_buckets(named, bucket_bytes=16, wire_dtype=torch.bfloat16))
    big_bucket = next(f for h, f in cast if h.tensors[0].name == "big")
    assert big_bucket.data_ptr() != big.data_ptr() and big_bucket.view(torch.bfloat16).tolist() == big.tolist()


def test_sglang_lists_and_msgpack_round_trip() -> None:
    header, _ = pack_bucket(_named())
    names, dtypes, shapes = header.sglang_lists()
    assert (names, dtypes, shapes) == (["a", "b", "c"], ["float32"] * 3, [[2, 3], [2], [2, 2]])
    assert BucketHeader.from_sglang_lists(names, dtypes, shapes).tensors == header.tensors
    again = BucketHeader.from_msgpack(header.to_msgpack())
    assert again.tensors == header.tensors and again.nbytes == 48
    assert again.tensors[1] == TensorSpec("b", "float32", (2,), 24)


@pytest.mark.parametrize("names,dtypes,shapes,match", [
    (["a"], ["float32"], [[2]], None),
    (["a", "b"], ["float32"], [[2], [2]], "equal non-zero lengths"),
    (["a"], ["load"], [[2]], "unknown dtype 'load'"),
    (["a"], ["float32"], [[-1]], "non-negative ints"),
    (["a"], ["float32"], [[True]], "non-negative ints"),
    ([""], ["float32"], [[1]], "non-empty string"),
    (["a", "b"], ["bfloat16", "float32"], [[1], [1]], "byte offset 2 is not a multiple"),
])
def test_sglang_lists_validation(names: list, dtypes: list, shapes: list, match: str | None) -> None:
    if match is None:
        assert BucketHeader.from_sglang_lists(names, dtypes, shapes).nbytes == 8
    else:
        with pytest.raises(BucketError, match=match):
            BucketHeader.from_sglang_lists(names, dtypes, shapes)


def test_msgpack_rejects_tampered_offsets_and_versions() -> None:
    header, _ = pack_bucket(_named())
    obj = msgpack.unpackb(header.to_msgpack())
    obj["tensors"][2][3] = 40
    with pytest.raises(BucketError, match="offset: 40 != contiguous offset 32"):
        BucketHeader.from_msgpack(msgpack.packb(obj))
    obj["v"] = 99
    with pytest.raises(BucketError, match="header.v"):
        BucketHeader.from_msgpack(msgpack.packb(obj))
    with pytest.raises(BucketError, match="not valid msgpack"):
        BucketHeader.from_msgpack(b"\xc1")


def test_unpack_checks_buffer() -> None:
    header, flat = pack_bucket(_named())
    with pytest.raises(BucketError, match="47 bytes received for a header describing 48"):
        unpack_bucket(flat[:47], header)
    with pytest.raises(BucketError, match="1-D uint8"):
        unpack_bucket(flat.view(torch.float32), header)


def test_plan_buckets_matches_iter_buckets() -> None:
    named = _named() + [("big", torch.zeros(20)), ("h", torch.ones(3, dtype=torch.float16)),
                        ("f", torch.ones(2)), ("d", torch.ones(2))]
    for wire in (None, torch.bfloat16):
        for limit in (8, 40, 1 << 20):
            for alone in (None, 16):
                for first in (None, 4):
                    got = [h for h, _ in iter_buckets(named, limit, wire, alone_bytes=alone, first_bucket_bytes=first)]
                    specs = [(n, wire if wire is not None else t.dtype, t.shape) for n, t in named]
                    assert plan_buckets(specs, limit, alone, zero_copy=wire is None,
                                        first_bucket_bytes=first) == got, (wire, limit, alone, first)


def test_alone_bytes_sends_large_wire_dtype_tensors_uncopied() -> None:
    named = [("s", torch.ones(2)), ("m", torch.arange(6.0)), ("t", torch.ones(2))]  # 8 B, 24 B, 8 B
    out = list(iter_buckets(named, bucket_bytes=64, alone_bytes=16))
    assert [[t.name for t in h.tensors] for h, _ in out] == [["m"], ["s", "t"]]
    assert out[0][1].data_ptr() == named[1][1].data_ptr()
    assert [[t.name for t in h.tensors] for h, _ in iter_buckets(named, 64)] == [["s", "m", "t"]]


def test_open_bucket_grows_with_the_ramp_while_alone_tensors_go_out() -> None:
    small = [(f"s{i}", torch.full((1,), float(i))) for i in range(5)]  # 4 B each
    big = [("A", torch.arange(4.0)), ("B", torch.arange(4.0) + 9)]  # 16 B each: alone, from their memory
    named = small[:1] + big + small[1:]
    out = [(h, f.clone()) for h, f in iter_buckets(named, 64, alone_bytes=16, first_bucket_bytes=8)]
    # s0 opened an 8 B bucket; once A and B were sent the ramp allows 32 B, so s1..s4 join it
    # instead of closing it at 8 B: one bucket fewer (one HTTP request and one collective).
    assert [[t.name for t in h.tensors] for h, _ in out] == [["A"], ["B"], ["s0", "s1", "s2", "s3", "s4"]]
    got = {n: t for h, f in out for n, t in unpack_bucket(f, h)}
    assert all(torch.equal(got[n], t) for n, t in named)
    assert plan_buckets([(n, t.dtype, t.shape) for n, t in named], 64, 16, first_bucket_bytes=8) == [h for h, _ in out]
    with pytest.raises(BucketError, match="capacity >= bucket_bytes"):
        list(iter_buckets(named, 64, ring=BufferRing(32)))
