"""HF-named FULL tensors from a Megatron model under any TP / PP layout.

Each pipeline stage exports its own layers under global layer indices (`layer_offset`).
Tensor-parallel shards are gathered over the TP group the caller passes in, several
parameters per collective: the shards of a group of parameters (up to `gather_bucket_bytes`
after gathering) are flattened into one buffer and all-gathered at once, then cut back into
per-rank shards and merged with the family adapter's `merge_tp_shards`. Shards are cast to
the wire dtype BEFORE the gather: merging and the HF conversion only move elements, so
casting first halves the traffic for bf16 and gives bit-identical results.

Every rank of the TP group must iterate the generator (it drives the collectives); only
`emit=True` ranks (the sender, tp rank 0) get tensors, the others get nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from spark_mcore.models import mcore_tp


def _as_list(models: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return [models] if isinstance(models, torch.nn.Module) else list(models)


def local_params(models: torch.nn.Module | Sequence[torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """(global megatron name, this rank's shard) for every weight of every model chunk."""
    out: list[tuple[str, torch.Tensor]] = []
    for model in _as_list(models):
        offset = mcore_tp.layer_offset(model)
        for name, tensor in mcore_tp.local_state(model).items():
            out.append((mcore_tp.shift_layer_index(name, offset), tensor.detach()))
    return out


def _gather_groups(params: list[tuple[str, torch.Tensor]], tp_size: int, limit: int,
                   wire_dtype: torch.dtype | None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of parameters with one dtype whose gathered size fits `limit`."""
    group: list[tuple[str, torch.Tensor]] = []
    size, dtype = 0, None
    for name, t in params:
        t_dtype = wire_dtype if wire_dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * t_dtype.itemsize * tp_size
        if group and (size + nbytes > limit or t_dtype != dtype):
            yield group
            group, size = [], 0
        group.append((name, t))
        size, dtype = size + nbytes, t_dtype
    if group:
        yield group


def _all_gather_flat(flat: torch.Tensor, tp_size: int, tp_group: Any) -> torch.Tensor:
    """flat [n] on every rank -> [tp_size, n] (row r = rank r's flat), one collective."""
    out = torch.empty(tp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=tp_group)
    return out.view(tp_size, flat.numel())


def _gathered_full(group: list[tuple[str, torch.Tensor]], tp_size: int, tp_group: Any,
                   wire_dtype: torch.dtype | None, merge: Any, emit: bool) -> list[tuple[str, torch.Tensor]]:
    """Full tensors of one gather group (empty list on non-emitting ranks)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(wire_dtype) if wire_dtype is not None and t.is_floating_point() else t

    sharded = [(n, t) for n, t in group if tp_size > 1 and mcore_tp.tp_kind(n) != "replicated"]
    rows = None
    if sharded:
        flat = torch.cat([cast(t).reshape(-1) for _, t in sharded])
        rows = _all_gather_flat(flat, tp_size, tp_group)
    if not emit:
        return []
    out, offset = [], 0
    for name, t in group:
        if rows is None or mcore_tp.tp_kind(name) == "replicated" or tp_size == 1:
            out.append((name, cast(t)))
            continue
        n = t.numel()
        shards = [rows[r, offset:offset + n].view(t.shape) for r in range(tp_size)]
        offset += n
        out.append((name, merge(name, shards)))
    return out


def iter_full_mcore(models: torch.nn.Module | Sequence[torch.nn.Module], tp_group: Any = None,
                    tp_size: int = 1, emit: bool = True, wire_dtype: torch.dtype | None = None,
                    gather_bucket_bytes: int = 256 * 1024 * 1024, merge: Any = mcore_tp.merge_tp_shards,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(global megatron name, FULL tensor in wire dtype) for this stage's parameters.

    All ranks of `tp_group` must drive the generator to the end together. With tp_size 1 no
    collective runs. Tensors of replicated parameters may alias the model's (do not modify).
    """
    if tp_size < 1:
        raise ValueError(f"tp_size={tp_size} must be >= 1")
    if tp_size > 1 and tp_group is None:
        raise ValueError("tp_group: pass the tensor-parallel process group (ParallelState.tp_group) for tp_size > 1")
    params = local_params(models)
    for group in _gather_groups(params, tp_size, gather_bucket_bytes, wire_dtype):
        yield from _gathered_full(group, tp_size, tp_group, wire_dtype, merge, emit)


def iter_hf_weights(models: torch.nn.Module | Sequence[torch.nn.Module], adapter: Any, tp_group: Any = None,
                    tp_size: int = 1, emit: bool = True, wire_dtype: torch.dtype | None = None,
                    gather_bucket_bytes: int = 256 * 1024 * 1024) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, FULL tensor) for this stage, via a model-family adapter bound to its ModelConfig
    (`get_adapter(family, cfg)`): `adapter.mcore_to_hf(name, full)` and `adapter.merge_tp_shards`.

    A tied output layer yields nothing (the adapter drops it). See `iter_full_mcore`.
    """
    for name, full in iter_full_mcore(models, tp_group, tp_size, emit, wire_dtype, gather_bucket_bytes,
                                      merge=adapter.merge_tp_shards):
        yield from adapter.mcore_to_hf(name, full)


def drain(items: Iterable[Any]) -> int:
    """Run a generator to the end (non-sender ranks driving the collectives); returns the count."""
    return sum(1 for _ in items)


__all__ = ["local_params", "iter_full_mcore", "iter_hf_weights", "drain"]
