"""Receiving side of a bucket broadcast (rollout servers other than SGLang, and tests).

`receive_bucket` mirrors what SGLang does for /update_weights_from_distributed: allocate the
bucket from the request's names/dtypes/shapes, join the sender's broadcast, rebuild the
tensors as views. `load_into` copies them into a module's parameters by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from spark_mcore.weights.bucket import DTYPES, BucketError, BucketHeader, unpack_bucket
from spark_mcore.weights.groups import WeightUpdateGroup


def receive_bucket(group: WeightUpdateGroup, header: BucketHeader, flattened: bool = True,
                   device: torch.device | str | None = None, buffer: torch.Tensor | None = None,
                   ) -> list[tuple[str, torch.Tensor]]:
    """Join the broadcast(s) of one bucket from group rank 0.

    flattened=True: ONE uint8 broadcast of header.nbytes, into `buffer` (a reusable 1-D uint8
    tensor; the returned tensors are views of it, valid until it is reused) when it is large
    enough, else a fresh allocation; False: one broadcast per tensor in header order (SGLang's
    per-tensor protocol). Returns (name, tensor) in header order.
    """
    dev = torch.device(device) if device is not None else group.device
    if flattened:
        reuse = buffer is not None and buffer.dtype == torch.uint8 and buffer.device == dev \
            and buffer.numel() >= header.nbytes
        flat = buffer[:header.nbytes] if reuse else torch.empty(header.nbytes, dtype=torch.uint8, device=dev)
        group.broadcast(flat, src=0)
        return unpack_bucket(flat, header)
    out = [(t.name, torch.empty(t.shape, dtype=DTYPES[t.dtype], device=dev)) for t in header.tensors]
    works = [group.broadcast(t, src=0, async_op=True) for _, t in out]
    for w in works:
        w.wait()
    return out


@torch.no_grad()
def load_into(params: Mapping[str, torch.Tensor], named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Copy received tensors into `params` (e.g. dict(model.named_parameters())), casting to
    each parameter's dtype. Checks every name and shape before writing anything."""
    named = list(named)
    for name, t in named:
        if name not in params:
            raise BucketError(f"weight '{name}' has no parameter in the receiving model; check the trainer's model "
                              f"family adapter (known e.g. {sorted(params)[:3]})")
        if tuple(params[name].shape) != tuple(t.shape):
            raise BucketError(f"weight '{name}': received shape {tuple(t.shape)} != model's {tuple(params[name].shape)}")
    for name, t in named:
        params[name].copy_(t)
    return [n for n, _ in named]


__all__ = ["receive_bucket", "load_into"]
