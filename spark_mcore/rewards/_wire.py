"""Framing of the pool <-> worker pipes: 4-byte big-endian length + UTF-8 JSON. No pickle;
JSON's ASCII escapes carry any Python str, lone surrogates included."""

from __future__ import annotations

import json
import struct
from typing import IO, Any

HEADER = struct.Struct(">I")


def encode_frame(obj: Any) -> bytes:
    payload = json.dumps(obj, ensure_ascii=True).encode("ascii")
    return HEADER.pack(len(payload)) + payload


def split_frames(buf: bytearray) -> list[Any]:
    """Pop every complete frame from the front of `buf` (left with any partial tail)."""
    frames = []
    while len(buf) >= HEADER.size:
        (size,) = HEADER.unpack_from(buf)
        if len(buf) < HEADER.size + size:
            break
        frames.append(json.loads(bytes(buf[HEADER.size : HEADER.size + size])))
        del buf[: HEADER.size + size]
    return frames


def read_frame(stream: IO[bytes]) -> Any | None:
    """The next frame from a blocking stream; None at EOF (also mid-frame: the writer died)."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    return None if len(payload) < size else json.loads(payload)
