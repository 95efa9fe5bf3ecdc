"""Small collectives over explicit groups, with no pickle (values travel as tensors)."""

from __future__ import annotations

import msgpack
import torch
import torch.distributed as dist


def broadcast_floats(values: dict[str, float] | None, src_global_rank: int, group: object) -> dict[str, float]:
    """Broadcasts a small dict of floats from `src_global_rank` to every rank of `group`.

    Non-source ranks pass None. The dict travels as msgpack bytes in a uint8 tensor.
    """
    if dist.get_world_size(group) == 1:
        return dict(values or {})
    is_src = dist.get_rank() == src_global_rank
    payload = msgpack.packb(values or {}) if is_src else b""
    size = torch.tensor([len(payload)], dtype=torch.long)
    dist.broadcast(size, src=src_global_rank, group=group)
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if is_src else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, src=src_global_rank, group=group)
    return dict(msgpack.unpackb(buf.numpy().tobytes())) if not is_src else dict(values or {})


def broadcast_tensor(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                     src_global_rank: int, group: object) -> torch.Tensor:
    """Broadcasts a tensor of known shape/dtype from the source rank of `group`."""
    if dist.get_world_size(group) == 1:
        assert t is not None
        return t
    buf = t.contiguous() if dist.get_rank() == src_global_rank else torch.empty(shape, dtype=dtype)
    dist.broadcast(buf, src=src_global_rank, group=group)
    return buf
