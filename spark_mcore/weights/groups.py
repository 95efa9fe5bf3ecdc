"""The weight-update process group between a trainer rank and rollout-engine ranks.

It follows SGLang's `/init_weights_update_group` rendezvous exactly, so a trainer built on it
can talk to real SGLang servers and to the CPU twin (spark_mcore.twin) alike:
  * rank 0 (the trainer) hosts a TCPStore at master_address:master_port; the other ranks
    (rank_offset + tp_rank of each server) connect to it as clients;
  * the store is wrapped in PrefixStore(group_name) and the group is created from it with
    torch's process-group helper (the same call torch.distributed.init_process_group makes),
    so gloo/NCCL find each other under the same keys;
  * the group is NOT part of any default world: a trainer process keeps its training world as
    the default group and a server process needs none.
Broadcasts use group-local ranks (`group_src=0`).
"""

from __future__ import annotations

import datetime
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

_BACKENDS = ("gloo", "nccl")


class WeightGroupError(RuntimeError):
    """The weight-update group could not be formed or used; the message says why."""


def resolve_backend(backend: str) -> str:
    """"auto" -> nccl with CUDA, else gloo; checks explicit choices."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in _BACKENDS:
        raise WeightGroupError(f"backend={backend!r} must be 'auto', 'gloo' or 'nccl'")
    if backend == "nccl" and not torch.cuda.is_available():
        raise WeightGroupError("backend='nccl' needs CUDA; use 'gloo' on CPU")
    return backend


def create_master_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store. port 0 binds a free port (read it back from `.port`)."""
    try:
        return dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as e:
        raise WeightGroupError(f"cannot listen on {host}:{port} for the weight-update group ({e}); set "
                               "weights.master_address to an address of this host and master_port to a "
                               "free port (0 = any)") from e


@dataclass
class WeightUpdateGroup:
    """A joined group. `rank` is this process's rank in it; rank 0 is the sender."""

    pg: Any
    rank: int
    world_size: int
    group_name: str
    backend: str
    store: Any

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Broadcast from group rank `src` (in place on receivers); returns a Work if async_op."""
        return dist.broadcast(tensor, group=self.pg, group_src=src, async_op=async_op)

    def destroy(self) -> None:
        """Leave the group (idempotent)."""
        if self.pg is not None:
            try:
                dist.destroy_process_group(self.pg)
            finally:
                c10d._world.pg_group_ranks.pop(self.pg, None)
                self.pg, self.store = None, None


def join_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str, backend: str = "auto", timeout_s: float = 600.0,
                             store: Any = None) -> WeightUpdateGroup:
    """Join (rank > 0) or open (rank 0, pass its `create_master_store`) the group.

    Blocks until all `world_size` ranks have joined. Rank 0 without `store` creates one at
    master_address:master_port.
    """
    if not 0 <= rank < world_size:
        raise WeightGroupError(f"rank={rank} must be in [0, world_size={world_size})")
    if not group_name:
        raise WeightGroupError("group_name must be non-empty")
    backend = resolve_backend(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        if rank == 0:
            store = create_master_store(master_address, master_port, world_size, timeout_s)
        else:
            try:
                store = dist.TCPStore(master_address, master_port, world_size, is_master=False, timeout=timeout)
            except (RuntimeError, OSError) as e:
                raise WeightGroupError(f"rank {rank} cannot reach the trainer's store at {master_address}:"
                                       f"{master_port} ({e}); check weights.master_address") from e
    pg = _new_group(dist.PrefixStore(group_name, store), rank, world_size, group_name, backend, timeout)
    return WeightUpdateGroup(pg, rank, world_size, group_name, backend, store)


def _new_group(store: Any, rank: int, world_size: int, group_name: str, backend: str,
               timeout: datetime.timedelta) -> Any:
    if group_name in c10d._world.pg_names.values():
        raise WeightGroupError(f"a process group named {group_name!r} already exists in this process; destroy it "
                               "first or use another weights.group_name")
    # The helper's keyword names moved across torch releases (pg_options -> backend_options).
    params = inspect.signature(c10d._new_process_group_helper).parameters
    kwargs: dict[str, Any] = {"group_name": group_name, "timeout": timeout}
    for opt in ("backend_options", "pg_options"):
        if opt in params:
            kwargs[opt] = None
            break
    try:
        pg, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend), store, **kwargs)
    except RuntimeError as e:
        raise WeightGroupError(f"forming weight-update group {group_name!r} (rank {rank}/{world_size}, "
                               f"{backend}) failed: {e}") from e
    # Group ranks are the global ranks of this group (it has no parent world).
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


__all__ = ["WeightGroupError", "WeightUpdateGroup", "create_master_store", "join_weight_update_group",
           "resolve_backend"]
