"""Small collectives over explicit groups, with no pickle (values travel as tensors)."""

from __future__ import annotations

from typing import Any

import msgpack
import torch
import torch.distributed as dist


def broadcast_floats(values: dict[str, float] | None, src_global_rank: int, group: object,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Broadcasts a small dict of floats from `src_global_rank` to every rank of `group`.

    Non-source ranks pass None. The dict travels as msgpack bytes in a uint8 tensor on `device`
    (the group's device: NCCL groups only move CUDA tensors).
    """
    if dist.get_world_size(group) == 1:
        return dict(values or {})
    is_src = dist.get_rank() == src_global_rank
    payload = msgpack.packb(values or {}) if is_src else b""
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(size, src=src_global_rank, group=group)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if is_src
           else torch.empty(int(size), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src=src_global_rank, group=group)
    return dict(msgpack.unpackb(buf.cpu().numpy().tobytes())) if not is_src else dict(values or {})


def broadcast_packed(value: Any, src_global_rank: int, group: object, device: torch.device | str = "cpu") -> Any:
    """Broadcasts any msgpack-able value (plain dicts / lists / str / numbers) from the source
    rank of `group` as bytes in a uint8 tensor; non-source ranks pass None."""
    if dist.get_world_size(group) == 1:
        return value
    is_src = dist.get_rank() == src_global_rank
    payload = msgpack.packb(value, use_bin_type=True) if is_src else b""
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(size, src=src_global_rank, group=group)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if is_src
           else torch.empty(int(size), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src=src_global_rank, group=group)
    return value if is_src else msgpack.unpackb(buf.cpu().numpy().tobytes(), raw=False)


def broadcast_tensor(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                     src_global_rank: int, group: object, device: torch.device | str = "cpu") -> torch.Tensor:
    """Broadcasts a tensor of known shape/dtype from the source rank of `group`; the transfer
    runs on `device` (the group's), the result comes back on the source tensor's device (CPU
    on the receivers)."""
    if dist.get_world_size(group) == 1:
        assert t is not None
        return t
    home = t.device if t is not None else torch.device("cpu")
    buf = t.contiguous().to(device) if dist.get_rank() == src_global_rank else torch.empty(shape, dtype=dtype,
                                                                                           device=device)
    dist.broadcast(buf, src=src_global_rank, group=group)
    return buf.to(home)


def broadcast_bytes(payload: bytes | None, src_global_rank: int, group: object,
                    device: torch.device | str = "cpu") -> bytes:
    """Broadcasts a byte string (e.g. msgpack) from `src_global_rank` to every rank of `group`
    as a uint8 tensor (size first). Non-source ranks pass None."""
    if dist.get_world_size(group) == 1:
        return payload or b""
    is_src = dist.get_rank() == src_global_rank
    size = torch.tensor([len(payload or b"") if is_src else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src_global_rank, group=group)
    buf = (torch.frombuffer(bytearray(payload or b"\0"), dtype=torch.uint8)[: int(size)].to(device) if is_src
           else torch.empty(int(size), dtype=torch.uint8, device=device))
    if int(size):
        dist.broadcast(buf, src=src_global_rank, group=group)
    if is_src:
        return payload or b""
    return buf.cpu().numpy().tobytes()


def all_gather_bytes(payload: bytes, group: object, device: torch.device | str = "cpu") -> list[bytes]:
    """Every rank's byte string, in group-rank order, on every rank of `group` (sizes are
    gathered first; the strings travel padded to the longest, as uint8 tensors)."""
    world = dist.get_world_size(group)
    if world == 1:
        return [payload]
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    if longest == 0:
        return [b""] * world
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return [p[: int(s)].cpu().numpy().tobytes() for p, s in zip(parts, sizes, strict=True)]
