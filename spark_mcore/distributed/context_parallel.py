"""Context parallelism: megatron's load-balanced sequence split and the gathers that undo it.

With CP size C a padded sequence of length T (T % 2C == 0) is cut into 2C equal chunks; CP
rank r holds chunks r and 2C-1-r, so with causal attention every rank has the same amount of
work (megatron's `get_batch_on_this_cp_rank` layout, which its rotary embedding and
Transformer Engine's CP attention expect):

    C = 2, T = 8, chunks of 2:   rank 0 -> positions [0 1 | 6 7],  rank 1 -> [2 3 | 4 5]

Tensors are split along `dim`; `gather_from_cp` all-gathers the local parts over the CP group
and restores the full order. Its backward comes in two kinds, picked by what follows it:
"owned" (no communication: everything after the gather is computed identically on every CP
rank, e.g. the loss on gathered log-probs, so each rank's gradient for its own chunks is
already complete) and "sum" (all-reduce: each rank's later work differs, e.g. attention of
its own queries over gathered keys, so gradients from all ranks add up).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

Backward = Literal["owned", "sum"]


def cp_positions(length: int, cp_size: int, cp_rank: int) -> Tensor:
    """[length / cp_size] long: the global positions CP rank `cp_rank` holds, in local order."""
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not a multiple of 2 * cp_size = {2 * cp_size}")
    chunk = length // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk),
                      torch.arange(second * chunk, (second + 1) * chunk)])


def split_for_cp(x: Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> Tensor:
    """x [..., T, ...] (T at `dim`) -> [..., T / cp_size, ...]: this rank's two chunks."""
    if cp_size == 1:
        return x
    index = cp_positions(x.shape[dim], cp_size, cp_rank).to(x.device)
    return x.index_select(dim, index)


def unsplit_from_cp(parts: list[Tensor], dim: int = 1) -> Tensor:
    """Inverse of `split_for_cp` over all ranks: parts[r] is rank r's split -> the full tensor."""
    cp_size = len(parts)
    if cp_size == 1:
        return parts[0]
    halves = [p.chunk(2, dim=dim) for p in parts]
    # chunk order 0..2C-1: the first halves of ranks 0..C-1, then the second halves of C-1..0
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim=dim)


class _GatherFromCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: Tensor, group: Any, dim: int, backward: Backward) -> Tensor:
        ctx.group, ctx.dim, ctx.backward = group, dim, backward
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(local) for _ in range(ctx.size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return unsplit_from_cp(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        grad = grad.contiguous()
        if ctx.backward == "sum":
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
        return split_for_cp(grad, ctx.size, ctx.rank, ctx.dim), None, None, None


def gather_from_cp(local: Tensor, group: Any, dim: int = 1, backward: Backward = "owned") -> Tensor:
    """This rank's split [..., T / C, ...] -> the full [..., T, ...] on every CP rank (autograd
    aware; see the module docstring for `backward`). Identity without a group of size > 1."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    if backward not in ("owned", "sum"):
        raise ValueError(f"backward must be 'owned' or 'sum', got {backward!r}")
    return _GatherFromCP.apply(local, group, dim, backward)


__all__ = ["cp_positions", "gather_from_cp", "split_for_cp", "unsplit_from_cp"]
