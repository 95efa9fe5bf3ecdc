"""Flat weight buckets: many named tensors packed into one byte buffer, sent by one collective.

Layout (identical to SGLang's `FlattenedTensorBucket`, so a bucket built here is what an
SGLang server reconstructs from the names/dtypes/shapes of /update_weights_from_distributed
with load_format="flattened_bucket"): the raw bytes of each tensor (C order), back to back in
list order, no padding; tensor i starts at the sum of the byte sizes before it, and that
offset must be a multiple of its element size (SGLang rejects unaligned tensors). With one
wire dtype per sync every offset is aligned; a tensor that would land unaligned starts a new
bucket instead.

The header (`BucketHeader`) holds names, dtypes, shapes and offsets; it travels as msgpack
(`to_msgpack` / `from_msgpack`, nothing pickled) or as SGLang's three lists (`sglang_lists`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

# Wire dtype names are torch's (SGLang does getattr(torch, name)); a whitelist, so a
# header never makes the receiver look up an arbitrary attribute of torch.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
WIRE_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                              "fp32": torch.float32, "keep": None}
HEADER_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024


class BucketError(ValueError):
    """A bucket header or buffer is malformed; the message names the field."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise BucketError(f"dtype {dtype} cannot travel in a weight bucket; supported: {sorted(DTYPES)}")
    return _NAMES[dtype]


def dtype_from_name(name: Any, where: str = "dtype") -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise BucketError(f"{where}: unknown dtype {name!r}; supported: {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside a bucket: bytes [offset, offset + nbytes) of the flat buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass
class BucketHeader:
    """Names, dtypes, shapes and offsets of one bucket; `nbytes` is the buffer length."""

    tensors: list[TensorSpec] = field(default_factory=list)
    index: int = 0

    @property
    def nbytes(self) -> int:
        return self.tensors[-1].offset + self.tensors[-1].nbytes if self.tensors else 0

    def sglang_lists(self) -> tuple[list[str], list[str], list[list[int]]]:
        """(names, dtypes, shapes) for UpdateWeightsFromDistributedReqInput."""
        return ([t.name for t in self.tensors], [t.dtype for t in self.tensors],
                [list(t.shape) for t in self.tensors])

    @classmethod
    def from_sglang_lists(cls, names: Any, dtypes: Any, shapes: Any, index: int = 0) -> BucketHeader:
        """Validate SGLang's three lists and compute the contiguous offsets (raises BucketError)."""
        if not isinstance(names, list) or not isinstance(dtypes, list) or not isinstance(shapes, list):
            raise BucketError("names/dtypes/shapes: expected three lists")
        if not names or not len(names) == len(dtypes) == len(shapes):
            raise BucketError(f"names/dtypes/shapes: need equal non-zero lengths, got "
                              f"{len(names)}, {len(dtypes)}, {len(shapes)}")
        header, offset = cls(index=index), 0
        for i, (name, dt, shape) in enumerate(zip(names, dtypes, shapes, strict=False)):
            if not isinstance(name, str) or not name:
                raise BucketError(f"names[{i}]: expected a non-empty string, got {name!r}")
            torch_dtype = dtype_from_name(dt, f"dtypes[{i}]")
            if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in shape):
                raise BucketError(f"shapes[{i}] ('{name}'): expected a list of non-negative ints, got {shape!r}")
            if offset % torch_dtype.itemsize:
                raise BucketError(f"'{name}': byte offset {offset} is not a multiple of its element size "
                                  f"{torch_dtype.itemsize}; order tensors by dtype")
            header.tensors.append(TensorSpec(name, dt, tuple(shape), offset))
            offset += header.tensors[-1].nbytes
        return header

    def to_msgpack(self) -> bytes:
        return msgpack.packb({"v": HEADER_VERSION, "index": self.index,
                              "tensors": [[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors]},
                             use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes | bytearray | memoryview) -> BucketHeader:
        """Decode and validate a msgpack header (offsets must match the contiguous layout)."""
        if len(data) > MAX_HEADER_BYTES:
            raise BucketError(f"header: {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            obj = msgpack.unpackb(bytes(data), raw=False, max_bin_len=0, max_ext_len=0)
        except (ValueError, msgpack.exceptions.ExtraData) as e:
            raise BucketError(f"header: not valid msgpack ({e})") from e
        if not isinstance(obj, dict) or obj.get("v") != HEADER_VERSION:
            raise BucketError(f"header.v: expected version {HEADER_VERSION}; sender and receiver must run the "
                              "same spark_mcore release")
        rows = obj.get("tensors")
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 4 for r in rows):
            raise BucketError("header.tensors: expected a list of [name, dtype, shape, offset]")
        index = obj.get("index")
        if not isinstance(index, int):
            raise BucketError(f"header.index: expected an int, got {index!r}")
        header = cls.from_sglang_lists([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], index)
        for spec, row in zip(header.tensors, rows, strict=False):
            if row[3] != spec.offset:
                raise BucketError(f"header.tensors['{spec.name}'].offset: {row[3]!r} != contiguous offset "
                                  f"{spec.offset}")
        return header


def unpack_bucket(flat: torch.Tensor, header: BucketHeader) -> list[tuple[str, torch.Tensor]]:
    """flat [nbytes] uint8 -> [(name, view of dtype/shape)] sharing flat's memory (no copy)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise BucketError(f"flat: expected a 1-D uint8 tensor, got {flat.dtype} {tuple(flat.shape)}")
    if flat.numel() != header.nbytes:
        raise BucketError(f"flat: {flat.numel()} bytes received for a header describing {header.nbytes}")
    return [(t.name, flat[t.offset:t.offset + t.nbytes].view(DTYPES[t.dtype]).view(t.shape))
            for t in header.tensors]


def pack_bucket(named: Sequence[tuple[str, torch.Tensor]], wire_dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> tuple[BucketHeader, torch.Tensor]:
    """Pack all tensors into ONE bucket: (header, flat [nbytes] uint8, a fresh buffer)."""
    total = sum(t.numel() * (wire_dtype.itemsize if wire_dtype is not None and t.is_floating_point()
                             else t.element_size()) for _, t in named)
    buckets = list(iter_buckets(named, total + 1, wire_dtype, device, num_buffers=1))  # +1: never zero-copy
    if len(buckets) != 1:
        raise BucketError("pack_bucket: tensors of mixed element sizes would be unaligned; use iter_buckets")
    return buckets[0]


class BufferRing:
    """`num_buffers` reusable bucket buffers of `capacity` bytes, allocated on first use.

    Keep one across syncs (BucketSender does) so bucket memory is not re-allocated - and on CPU
    re-faulted page by page - at every sync; `clear()` frees it.
    """

    def __init__(self, capacity: int, num_buffers: int = 2) -> None:
        if capacity <= 0 or num_buffers < 1:
            raise BucketError(f"capacity={capacity} and num_buffers={num_buffers} must be >= 1")
        self.capacity, self.num_buffers = capacity, num_buffers
        self.buffers: list[torch.Tensor | None] = [None] * num_buffers
        self.next = 0

    def take(self, nbytes: int, device: torch.device | str) -> torch.Tensor:
        slot = self.next
        self.next = (self.next + 1) % self.num_buffers
        if nbytes > self.capacity:  # one oversized tensor: a buffer of its own, dropped after use
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        buf = self.buffers[slot]
        if buf is None or buf.device != torch.device(device):
            buf = self.buffers[slot] = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        return buf

    def clear(self) -> None:
        self.buffers = [None] * self.num_buffers


class _Layout:
    """Where each tensor of a stream goes: the one decision procedure behind `iter_buckets`
    (which then copies) and `plan_buckets` (which only describes), so both always agree.

    Two kinds of bucket: a tensor of at least min(alone_bytes, capacity) that needs no copy
    travels alone, from its own memory, at once; every other tensor is copied into the open
    bucket, which is sent when the next tensor would overflow it (or land unaligned: SGLang
    rejects that) or at the end. A tensor that travels alone does NOT close the open bucket:
    the small tensors around the big ones keep filling it, so a sync needs fewer buckets (one
    HTTP announce and one collective each) than when every big tensor split the stream. The
    receiver loads each bucket by name, so the order of tensors across buckets is free.

    Bucket sizes ramp up: the bucket opened after k buckets were sent holds at most
    first_bucket_bytes * 2**k, up to bucket_bytes (no ramp: always bucket_bytes). The sender
    packs bucket k+1 while bucket k is on the wire, but nothing is on the wire while the FIRST
    bucket is packed: a full-size first bucket exposes its whole copy (and cast); a small one
    starts the wire almost at once, and doubling keeps each packing short next to the sends
    before it.
    """

    def __init__(self, bucket_bytes: int, alone_bytes: int | None, first_bucket_bytes: int | None) -> None:
        if bucket_bytes <= 0:
            raise BucketError(f"bucket_bytes={bucket_bytes} must be >= 1")
        self.bucket_bytes, self.alone_bytes = bucket_bytes, alone_bytes
        self.first = first_bucket_bytes if first_bucket_bytes and first_bucket_bytes < bucket_bytes else None
        self.index = 0  # buckets sent so far = the index of the next one sent
        self.count = self.offset = 0  # tensors and bytes in the open bucket (count 0: none open)
        self.open_capacity = 0

    def capacity(self) -> int:
        if self.first is None:
            return self.bucket_bytes
        return min(self.bucket_bytes, self.first << min(self.index, 62))

    def goes_alone(self, nbytes: int) -> bool:
        """Does a tensor of this size that needs no copy travel alone (from its own memory)?"""
        cap = self.capacity()
        return nbytes >= (cap if self.alone_bytes is None or self.alone_bytes <= 0 else min(self.alone_bytes, cap))

    def closes(self, spec: TensorSpec) -> bool:
        """Must the open bucket be sent before `spec` is copied into it? The open bucket may
        grow with the ramp while alone tensors are sent (its packing is then hidden behind
        them), up to bucket_bytes: its buffer is a full-size ring buffer unless one tensor
        alone outgrew bucket_bytes, in which case open_capacity is that buffer's size."""
        limit = max(self.open_capacity, min(self.capacity(), self.bucket_bytes))
        return self.count > 0 and (self.offset + spec.nbytes > limit
                                   or self.offset % DTYPES[spec.dtype].itemsize != 0)

    def sent(self, whole_open_bucket: bool) -> int:
        """Count one sent bucket (the open one, or an alone tensor); returns its index."""
        if whole_open_bucket:
            self.count = self.offset = 0
        self.index += 1
        return self.index - 1

    def add(self, spec: TensorSpec) -> int:
        """Append `spec` (its offset must be `self.offset`) to the open bucket, opening one if
        none is; returns the capacity to allocate when it opened one, else 0."""
        opened = 0
        if self.count == 0:
            opened = self.open_capacity = max(self.capacity(), spec.nbytes, 1)
        self.count += 1
        self.offset += spec.nbytes
        return opened


def plan_buckets(specs: Iterable[tuple[str, torch.dtype, Sequence[int]]], bucket_bytes: int,
                 alone_bytes: int | None = None, zero_copy: bool = True,
                 first_bucket_bytes: int | None = None) -> list[BucketHeader]:
    """The headers `iter_buckets` produces for tensors of these (name, wire dtype, shape), in
    the order it yields them, without any data: what a receiver that knows the tensor list
    expects, bucket by bucket. zero_copy=True: the sender's tensors are already in the wire
    dtype on the wire device (so large ones travel alone); False: every tensor is copied."""
    layout = _Layout(bucket_bytes, alone_bytes, first_bucket_bytes)
    headers: list[BucketHeader] = []
    current: list[TensorSpec] = []
    for name, dtype, shape in specs:
        spec = TensorSpec(name, dtype_name(dtype), tuple(int(s) for s in shape), 0)
        if zero_copy and layout.goes_alone(spec.nbytes):
            headers.append(BucketHeader([spec], layout.sent(False)))
            continue
        if layout.closes(spec):
            headers.append(BucketHeader(current, layout.sent(True)))
            current = []
        spec = TensorSpec(spec.name, spec.dtype, spec.shape, layout.offset)
        layout.add(spec)
        current.append(spec)
    if current:
        headers.append(BucketHeader(current, layout.sent(True)))
    return headers


def _own_bytes(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The tensor's own memory as bytes when it needs no cast, copy or move."""
    if tensor.dtype != dtype or not tensor.is_contiguous() or tensor.device != device:
        return None
    return tensor.detach().reshape(-1).view(torch.uint8)


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 wire_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 num_buffers: int = 2, ring: BufferRing | None = None, alone_bytes: int | None = None,
                 first_bucket_bytes: int | None = None) -> Iterator[tuple[BucketHeader, torch.Tensor]]:
    """Stream (name, tensor) into buckets of at most `bucket_bytes` bytes (see _Layout).

    Yields (header, flat [header.nbytes] uint8); header.index counts the yields. Each tensor is
    cast to `wire_dtype` (floating tensors only; None keeps dtypes) while it is copied into the
    open bucket on `device` (default: the first tensor's device), as soon as it arrives, so the
    caller's tensor can be freed. A tensor of at least min(alone_bytes, bucket capacity) that
    needs no cast or move is yielded at once, alone, as its own memory (no copy: leave it
    unmodified until its collective is done) - possibly before the open bucket holding earlier
    tensors; any other tensor larger than the capacity gets a bucket (buffer) of its own.
    first_bucket_bytes: the first bucket's capacity, doubled per bucket up to bucket_bytes.
    Buffers come from `ring` (default: a fresh BufferRing of `num_buffers`) round-robin: a
    yielded buffer is overwritten when the generator is advanced `num_buffers` more times, so
    finish its collective before that.
    """
    layout = _Layout(bucket_bytes, alone_bytes, first_bucket_bytes)
    ring = ring or BufferRing(bucket_bytes, num_buffers)
    if ring.capacity < bucket_bytes:  # an open bucket may grow to bucket_bytes (see _Layout.closes)
        raise BucketError(f"ring: buffers of {ring.capacity} bytes cannot hold buckets of {bucket_bytes}; "
                          "make the BufferRing with capacity >= bucket_bytes")
    target: torch.device | None = torch.device(device) if device is not None else None
    specs: list[TensorSpec] = []
    buf: torch.Tensor | None = None
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise BucketError(f"'{name}': expected a torch.Tensor, got {type(tensor).__name__}")
        target = target or tensor.device
        dtype = wire_dtype if wire_dtype is not None and tensor.is_floating_point() else tensor.dtype
        spec = TensorSpec(name, dtype_name(dtype), tuple(tensor.shape), 0)
        own = _own_bytes(tensor, dtype, target) if layout.goes_alone(spec.nbytes) else None
        if own is not None:
            yield BucketHeader([spec], layout.sent(False)), own
            continue
        if layout.closes(spec):
            flat = buf[:layout.offset]
            yield BucketHeader(specs, layout.sent(True)), flat
            specs = []
        spec = TensorSpec(name, spec.dtype, spec.shape, layout.offset)
        if opened := layout.add(spec):
            buf = ring.take(opened, target)
        # copy_ casts and moves in one pass: no temporary in the wire dtype.
        buf[spec.offset:spec.offset + spec.nbytes].view(dtype).view(spec.shape).copy_(tensor)
        specs.append(spec)
    if specs:
        yield BucketHeader(specs, layout.index), buf[:layout.offset]


__all__ = ["DTYPES", "WIRE_DTYPES", "BucketError", "TensorSpec", "BucketHeader", "dtype_name", "dtype_from_name",
           "unpack_bucket", "pack_bucket", "iter_buckets", "plan_buckets", "BufferRing"]
