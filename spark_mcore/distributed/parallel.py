"""Process-group setup for the Megatron actor: torch.distributed + megatron parallel_state.

`init_distributed(cfg)` is the one entry point; it returns a `ParallelState` that holds the
groups and ranks so that other code receives them explicitly instead of reading globals.
"""

from __future__ import annotations

import inspect
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.cpu_shims import apply_cpu_shims

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_BACKENDS = {"auto", "gloo", "nccl"}


@dataclass
class ParallelState:
    """Process groups and coordinates of this rank (megatron order tp-cp-ep-dp-pp).

    rank / world_size are global; the *_rank / *_size fields are within each group.
    `mp_group` spans tp x pp (the ranks that hold one full model replica).
    vp_size: model chunks per pipeline rank (virtual pipeline), None without interleaving.
    """

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    mp_group: Any
    device: torch.device
    backend: str
    seed: int
    vp_size: int | None = None
    cp_rank: int = 0  # context-parallel rank (dp_rank excludes CP: CP ranks share a dp_rank)
    cp_size: int = 1
    cp_group: Any = None  # None when cp_size == 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def find_free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str) -> str:
    """"auto" -> nccl with CUDA, gloo without; validates explicit choices."""
    if backend not in _BACKENDS:
        raise ConfigError(f"parallel.backend={backend!r} must be one of {sorted(_BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend='nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    return backend


def _init_process_group(backend: str, timeout_s: int) -> None:
    """env:// under torchrun (all of RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set), else a
    single-process group whose TCP store binds port 0 (no port race)."""
    timeout = timedelta(seconds=timeout_s)
    if all(k in os.environ for k in _TORCHRUN_ENV):
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)


def _set_device(backend: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _initialize_model_parallel(tp: int, pp: int, backend: str, cp: int = 1, vpp: int | None = None) -> None:
    """parallel_state.initialize_model_parallel, passing only kwargs this megatron accepts."""
    from megatron.core import parallel_state as ps

    kwargs: dict[str, Any] = {}
    params = inspect.signature(ps.initialize_model_parallel).parameters
    if "create_gloo_process_groups" in params:
        # With a gloo default group the extra gloo groups are duplicates (and cost time).
        kwargs["create_gloo_process_groups"] = backend != "gloo"
    if cp > 1:
        kwargs["context_parallel_size"] = cp
    if vpp is not None:
        kwargs["virtual_pipeline_model_parallel_size"] = vpp
    ps.initialize_model_parallel(tp, pp, **kwargs)


def _seed(seed: int) -> None:
    """Default generator <- seed (same on all ranks, so CPU-initialised master weights are
    identical across TP ranks); megatron's tracker adds the per-TP-rank model-parallel stream."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(cfg: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> ParallelState:
    """Initialise torch.distributed (if needed), megatron model parallelism and RNG.

    World size must be a multiple of tp * pp; data parallel size is the quotient.
    """
    from megatron.core import parallel_state as ps

    backend = resolve_backend(cfg.backend)
    apply_cpu_shims()
    if not dist.is_initialized():
        _init_process_group(backend, timeout_s)
    else:
        backend = str(dist.get_backend())
    world = dist.get_world_size()
    cfg.check_device()
    if world % (cfg.tp * cfg.pp * cfg.cp):
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tp * parallel.pp * parallel.cp = "
            f"{cfg.tp} * {cfg.pp} * {cfg.cp}; launch a multiple of {cfg.tp * cfg.pp * cfg.cp} processes"
        )
    device = _set_device(backend)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _initialize_model_parallel(cfg.tp, cfg.pp, backend, cfg.cp, cfg.virtual_pipeline_size)
    _seed(seed)
    return ParallelState(
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        device=device,
        backend=backend,
        seed=seed,
        vp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=cfg.cp,
        cp_group=ps.get_context_parallel_group() if cfg.cp > 1 else None,
    )


def destroy_distributed() -> None:
    """Tear down megatron groups and the default process group; safe to call repeatedly."""
    try:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()  # only resets globals: safe when nothing is initialised
    except ImportError:
        pass
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
