"""Pickle-free wire format for ZeroMQ multipart messages.

A message is a list of frames:
  frame 0      msgpack map {"v": SCHEMA_VERSION, "type": str, "meta": map,
                            "tensors": [[name, dtype, shape, frame_index], ...]}
  frame 1..N   raw bytes of one tensor each: C-contiguous, little-endian, in the order of the
               tensor table (frame_index i + 1 holds table entry i).
bfloat16 travels as its int16 bit pattern (numpy has no bf16) and is viewed back on decode.
Nothing is unpickled: msgpack yields only plain containers, and tensor frames are reinterpreted
as numbers after their byte length has been checked against shape x dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

# 2: result texts travel as a uint8 frame (protocol.result_tensors); 3: `results` column-wise;
# 4: hello / heartbeat / welcome carry max_message_bytes
SCHEMA_VERSION = 4

# wire name -> (torch dtype, little-endian numpy dtype used for the bytes)
_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float64": (torch.float64, np.dtype("<f8")),
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("?")),
}
_TORCH_TO_WIRE = {tdt: name for name, (tdt, _) in _DTYPES.items()}
_NATIVE = {name: npd.isnative for name, (_, npd) in _DTYPES.items()}
# Bound on one header so that a hostile frame 0 cannot make msgpack allocate without limit.
MAX_HEADER_BYTES = 64 * 1024 * 1024

Frame = bytes | bytearray | memoryview


class WireError(ValueError):
    """A message does not follow the wire format; the text names the offending field."""


def supported_dtypes() -> list[str]:
    return sorted(_DTYPES)


def _tensor_frame(name: str, t: torch.Tensor) -> tuple[list[Any], memoryview]:
    """Table entry and zero-copy byte view of tensor `t` (any shape, supported dtype)."""
    if not isinstance(t, torch.Tensor):
        raise WireError(f"tensors['{name}']: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _TORCH_TO_WIRE:
        raise WireError(
            f"tensors['{name}'].dtype: {t.dtype} is not supported on the wire; "
            f"cast to one of {supported_dtypes()}"
        )
    wire_dtype = _TORCH_TO_WIRE[t.dtype]
    cpu = t.detach().to("cpu").contiguous()
    if cpu.dtype == torch.bfloat16:
        cpu = cpu.view(torch.int16)
    arr = cpu.numpy()
    np_dtype = _DTYPES[wire_dtype][1]
    if arr.dtype != np_dtype:  # only on big-endian hosts: swap to the wire byte order
        arr = arr.astype(np_dtype)
    return [name, wire_dtype, list(t.shape), -1], memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")


def encode(msg_type: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> list[Frame]:
    """Serialise one message to ZeroMQ frames (see the module docstring for the layout).

    `meta` must hold only msgpack types (None, bool, int, float, str, bytes, list, dict).
    Tensor frames are zero-copy views of CPU tensors: send them before mutating the tensors.
    """
    if not isinstance(msg_type, str) or not msg_type:
        raise WireError(f"msg_type: expected a non-empty string, got {msg_type!r}")
    if not isinstance(meta, dict):
        raise WireError(f"meta: expected a dict, got {type(meta).__name__}")
    table: list[list[Any]] = []
    frames: list[Frame] = []
    for i, (name, t) in enumerate((tensors or {}).items()):
        if not isinstance(name, str) or not name:
            raise WireError(f"tensors: names must be non-empty strings, got {name!r}")
        entry, view = _tensor_frame(name, t)
        entry[3] = i + 1
        table.append(entry)
        frames.append(view)
    header = {"v": SCHEMA_VERSION, "type": msg_type, "meta": meta, "tensors": table}
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError) as e:
        raise WireError(f"meta: not msgpack-serialisable ({e}); use plain dict/list/str/int/float/bool/None") from e
    return [packed, *frames]


def _as_buffer(frame: Any, index: int) -> memoryview:
    if type(frame) is zmq.Frame:  # the receive path: a writable byte view, no copy
        return frame.buffer
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return memoryview(frame).cast("B") if isinstance(frame, memoryview) else memoryview(frame)
    buf = getattr(frame, "buffer", None)  # zmq.Frame from recv_multipart(copy=False)
    if buf is not None:
        return memoryview(buf).cast("B")
    raise WireError(f"frames[{index}]: expected bytes or a zmq.Frame, got {type(frame).__name__}")


def _check_header(header: Any) -> tuple[str, dict[str, Any], list[Any]]:
    if not isinstance(header, dict):
        raise WireError(f"header: expected a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if version != SCHEMA_VERSION:
        raise WireError(
            f"header.v: schema version {version!r} is not supported (this build speaks {SCHEMA_VERSION}); "
            "run producer and consumer from the same spark_mcore release"
        )
    msg_type, meta, table = header.get("type"), header.get("meta"), header.get("tensors")
    if not isinstance(msg_type, str) or not msg_type:
        raise WireError(f"header.type: expected a non-empty string, got {msg_type!r}")
    if not isinstance(meta, dict):
        raise WireError(f"header.meta: expected a map, got {type(meta).__name__}")
    if not isinstance(table, list):
        raise WireError(f"header.tensors: expected a list, got {type(table).__name__}")
    return msg_type, meta, table


def _bad_entry(entry: Any, i: int, frames: Sequence[Any], used: set[int]) -> WireError:
    """The error for a tensor table entry that failed the fast checks in `_decode_array`."""
    where = f"header.tensors[{i}]"
    if not isinstance(entry, list) or len(entry) != 4:
        return WireError(f"{where}: expected [name, dtype, shape, frame_index], got {entry!r}")
    name, dtype, shape, index = entry
    if not isinstance(name, str) or not name:
        return WireError(f"{where}.name: expected a non-empty string, got {name!r}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        return WireError(f"{where}.dtype: unknown dtype {dtype!r} for '{name}'; known: {supported_dtypes()}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        return WireError(f"{where}.shape: expected a list of non-negative ints for '{name}', got {shape!r}")
    if type(index) is not int or not 1 <= index < len(frames):
        return WireError(f"{where}.frame_index: {index!r} for '{name}' points outside the {len(frames)} frames "
                         "received (missing tensor frame?)")
    return WireError(f"{where}.frame_index: frame {index} is claimed by two tensors")


def _decode_array(entry: Any, i: int, frames: Sequence[Any], used: set[int]) -> tuple[str, str, np.ndarray]:
    """(name, wire dtype, flat-or-shaped numpy view of the frame) for tensor table entry `i`.
    The happy path is a handful of exact-type checks (msgpack yields exact types); any failure
    is explained by `_bad_entry`."""
    if type(entry) is not list or len(entry) != 4:
        raise _bad_entry(entry, i, frames, used)
    name, dtype, shape, index = entry
    spec = _DTYPES.get(dtype) if type(dtype) is str else None
    if (type(name) is not str or not name or spec is None or type(shape) is not list
            or not all(type(s) is int and s >= 0 for s in shape)
            or type(index) is not int or not 1 <= index < len(frames) or index in used):
        raise _bad_entry(entry, i, frames, used)
    used.add(index)
    np_dtype = spec[1]
    buf = _as_buffer(frames[index], index)
    expected = (shape[0] if len(shape) == 1 else math.prod(shape)) * np_dtype.itemsize
    if buf.nbytes != expected:
        raise WireError(f"header.tensors[{i}]: frame {index} of '{name}' has {buf.nbytes} bytes, but shape {shape} x "
                        f"{dtype} needs {expected}")
    arr = np.frombuffer(buf, dtype=np_dtype)
    # Zero-copy when the frame is writable, aligned and in host byte order (a zmq.Frame received
    # with copy=False: the array keeps the frame alive); otherwise one copy, so that the result
    # always owns writable, aligned memory (bytes are read-only, big-endian hosts swap).
    flags = arr.flags
    if not (flags.writeable and flags.aligned and _NATIVE[dtype]):
        arr = arr.astype(np_dtype.newbyteorder("="), copy=True)
    return name, dtype, (arr if len(shape) == 1 else arr.reshape(shape))


def decode_arrays(frames: Sequence[Any]) -> tuple[str, dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    """`decode` without the torch views: (msg_type, meta, {name: (wire dtype, numpy array)});
    a bfloat16 tensor arrives as its int16 bit pattern. Same validation as `decode`."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise WireError("frames: expected a non-empty list of frames (frame 0 = msgpack header)")
    head = _as_buffer(frames[0], 0)
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"frames[0]: header of {head.nbytes} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated exception types on bad input
        raise WireError(f"frames[0]: not a valid msgpack header ({type(e).__name__}: {e})") from e
    msg_type, meta, table = _check_header(header)
    if len(frames) != 1 + len(table):
        raise WireError(
            f"frames: header lists {len(table)} tensors but {len(frames) - 1} tensor frames arrived"
        )
    arrays: dict[str, tuple[str, np.ndarray]] = {}
    used: set[int] = set()
    for i, entry in enumerate(table):
        name, dtype, arr = _decode_array(entry, i, frames, used)
        if name in arrays:
            raise WireError(f"header.tensors[{i}].name: duplicate tensor name '{name}'")
        arrays[name] = (dtype, arr)
    return msg_type, meta, arrays


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's enum wrappers cost more than the call


def readable(sock: zmq.Socket) -> bool:
    """A message is queued on `sock` (ZMQ_EVENTS: no poller built, no wait)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """`sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)` with plain int flags (pyzmq's
    flag enums cost a few microseconds per frame); raises zmq.Again like it when the queue is full
    (a multipart message is queued whole or not at all)."""
    *head, last = frames
    for frame in head:
        sock.send(frame, _NOBLOCK | _SNDMORE, copy=False)
    sock.send(last, _NOBLOCK, copy=False)


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """`sock.recv_multipart(copy=False)` at half the cost: each frame says itself whether more
    follow (`Frame.more`), so no RCVMORE option is read (and wrapped) per frame."""
    frame = sock.recv(copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(copy=False)
        frames.append(frame)
    return frames


def as_tensor(dtype: str, arr: np.ndarray) -> torch.Tensor:
    """The torch view of an array from `decode_arrays` (shares its memory)."""
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def decode(frames: Sequence[Any]) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Parse and validate frames from `encode`; returns (msg_type, meta, tensors).

    Raises WireError naming the field for: an unknown schema version, a malformed header,
    an unknown dtype, a missing or extra frame, or a frame whose byte length differs from
    shape x dtype.
    """
    msg_type, meta, arrays = decode_arrays(frames)
    return msg_type, meta, {name: as_tensor(dtype, arr) for name, (dtype, arr) in arrays.items()}


__all__ = ["SCHEMA_VERSION", "WireError", "encode", "decode", "decode_arrays", "as_tensor", "readable", "recv_frames", "send_frames", "supported_dtypes"]
