"""The whole policy's HF-named full tensors on ONE rank of a model replica, from any TP / PP
layout: what an in-process engine (the transformers engine on the replica's first rank) and
the HF export need.

    every stage: TP shards gathered over the stage's TP group (`iter_hf_weights`; its TP
                 ranks drive the all-gathers, its tp_rank 0 gets full tensors)
    stage 0, tp_rank 0 (the replica's first rank): yields its own stage's tensors, then those
                 of stages 1 .. P-1, received over the PP group of tp_rank 0 in flat buckets
                 (msgpack header + one uint8 buffer per bucket, point to point, nothing pickled)

Every rank of the replica (its model-parallel group) must run the generator to the end
(`drain` on ranks that want nothing); only the first rank gets tensors. Replicas do this
independently: every DP replica holds the same weights, so no data crosses replicas.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from spark_mcore.weights.bucket import BucketHeader, iter_buckets, unpack_bucket
from spark_mcore.weights.export import iter_hf_weights

_END = -1  # header length that closes a stage's stream


def is_replica_root(ps: Any) -> bool:
    """The rank that receives the whole model: tp_rank 0 of pipeline stage 0."""
    return ps.tp_rank == 0 and ps.pp_rank == 0


def _send_stage(named: Iterator[tuple[str, torch.Tensor]], dst: int, group: Any, device: torch.device,
                bucket_bytes: int) -> None:
    for header, flat in iter_buckets(named, bucket_bytes, device=device, num_buffers=1):
        head = header.to_msgpack()
        dist.send(torch.tensor([len(head), flat.numel()], dtype=torch.long, device=device), dst=dst, group=group)
        dist.send(torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device), dst=dst, group=group)
        dist.send(flat.contiguous(), dst=dst, group=group)
    dist.send(torch.tensor([_END, 0], dtype=torch.long, device=device), dst=dst, group=group)


def _receive_stage(src: int, group: Any, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    while True:
        sizes = torch.empty(2, dtype=torch.long, device=device)
        dist.recv(sizes, src=src, group=group)
        head_len, flat_len = (int(v) for v in sizes.tolist())
        if head_len == _END:
            return
        head = torch.empty(head_len, dtype=torch.uint8, device=device)
        dist.recv(head, src=src, group=group)
        header = BucketHeader.from_msgpack(head.cpu().numpy().tobytes())
        flat = torch.empty(flat_len, dtype=torch.uint8, device=device)
        dist.recv(flat, src=src, group=group)
        yield from unpack_bucket(flat, header)


def gather_hf_weights(models: torch.nn.Module | Sequence[torch.nn.Module], adapter: Any, ps: Any,
                      wire_dtype: torch.dtype | None = None,
                      bucket_bytes: int = 256 * 1024 * 1024) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, FULL tensor) of the whole model on the replica's first rank; nothing elsewhere.

    `models`: this rank's chunks; `adapter`: the family adapter bound to the ModelConfig; `ps`:
    ParallelState (tp/pp ranks and groups, device). Collective over the replica: run it to the
    end on every rank of it. Tensors may alias the model's or a receive buffer: copy them
    before the model changes if they must outlive it.
    """
    stage = iter_hf_weights(models, adapter, ps.tp_group, ps.tp_size, emit=ps.tp_rank == 0, wire_dtype=wire_dtype,
                            gather_bucket_bytes=bucket_bytes)
    if ps.pp_size == 1 or ps.tp_rank != 0:
        yield from stage  # tp_rank > 0: drives the TP gathers, yields nothing
        return
    stage_ranks = dist.get_process_group_ranks(ps.pp_group)  # tp_rank 0 of every stage, in stage order
    if ps.pp_rank == 0:
        yield from stage
        for src in stage_ranks[1:]:
            yield from _receive_stage(src, ps.pp_group, ps.device)
    else:
        _send_stage(stage, stage_ranks[0], ps.pp_group, ps.device, bucket_bytes)


def actor_hf_weights(actor: Any, wire_dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`gather_hf_weights` of a MegatronActor's policy (its chunks, adapter and ParallelState)."""
    return gather_hf_weights(actor.chunks, actor.adapter, actor.pstate, wire_dtype=wire_dtype)


__all__ = ["gather_hf_weights", "actor_hf_weights", "is_replica_root"]
