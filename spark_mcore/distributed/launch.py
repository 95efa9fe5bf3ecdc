"""Start N local worker processes that form one torch.distributed world (tests, CPU demos).

Each worker gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT on a free port), so `init_distributed` takes its env:// path exactly as under
torchrun. Process groups are always destroyed when the worker function returns or raises.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from spark_mcore.distributed.parallel import destroy_distributed, find_free_port


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int,
           threads: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        fn(rank, *args)
    finally:
        destroy_distributed()


def spawn_workers(fn: Callable[..., None], world_size: int, args: tuple[Any, ...] = (),
                  timeout_s: float = 300.0, threads_per_worker: int = 1) -> None:
    """Run `fn(rank, *args)` in `world_size` spawned processes; raise if any fails or time runs out.

    `fn` must be importable by name (a module-level function). On timeout the children this
    call started are terminated.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    port = find_free_port()
    ctx = mp.spawn(_entry, args=(fn, world_size, port, threads_per_worker, args),
                   nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} workers of {fn.__name__} exceeded {timeout_s} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
