"""Where launched SGLang servers run and what environment they get (faults 3 and 4).

GPU placement: trainer ranks on this node use local GPUs 0 .. local_world_size - 1 (rank r on
`cuda:LOCAL_RANK`), so launched servers take the GPUs after them: server i gets
[first + i * g, first + (i + 1) * g) with g = gpus_per_server and first = the trainer's local
GPU count unless `sglang.first_gpu` says otherwise. Indices are of the launcher's visible
devices; `visible_devices` maps them through its own CUDA_VISIBLE_DEVICES, and each server is
started with exactly its GPUs visible (and --base-gpu-id 0), so it cannot touch another's.

Environment: a server started from a torchrun worker inherits RANK, WORLD_SIZE, MASTER_ADDR,
TORCHELASTIC_USE_AGENT_STORE=True, ...; SGLang's own process group would then look for the
trainer's agent store and hang until the health check gives up. `scrubbed_env` drops them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from spark_mcore.config.loader import ConfigError

# set by torch.distributed.run's agent for each worker (torch/distributed/elastic/agent/server/
# local_elastic_agent.py) and read by init_process_group's env:// rendezvous
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
                "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def scrubbed_env(base: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without torchrun's variables, then `extra` on top."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in TORCHRUN_ENV}
    env.update(extra or {})
    return env


def trainer_local_gpus(env: Mapping[str, str] | None = None, cuda: bool = True) -> int:
    """GPUs the trainer ranks of this node occupy: LOCAL_WORLD_SIZE under torchrun, else one
    (a single CUDA process uses cuda:0), none without CUDA."""
    env = os.environ if env is None else env
    if not cuda:
        return 0
    return int(env.get("LOCAL_WORLD_SIZE", "1"))


def server_gpu_ids(num_servers: int, gpus_per_server: int, first_gpu: int, device_count: int) -> list[list[int]]:
    """Local GPU indices of each server; refuses a placement past the node's GPUs."""
    need = first_gpu + num_servers * gpus_per_server
    if device_count and need > device_count:
        raise ConfigError(
            f"sglang: {num_servers} server(s) x sglang.gpus_per_server={gpus_per_server} from GPU {first_gpu} "
            f"need GPUs {first_gpu}..{need - 1}, but this node has {device_count}; the trainer uses GPUs "
            f"0..{first_gpu - 1} (launch fewer trainer ranks, lower sglang.num_servers, or attach to servers "
            "elsewhere with sglang.urls)")
    return [list(range(first_gpu + i * gpus_per_server, first_gpu + (i + 1) * gpus_per_server))
            for i in range(num_servers)]


def visible_devices(ids: Sequence[int], env: Mapping[str, str] | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for a child that should see exactly the launcher's GPUs `ids`."""
    env = os.environ if env is None else env
    parent = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not parent:
        return ",".join(str(i) for i in ids)
    if max(ids, default=-1) >= len(parent):
        raise ConfigError(f"sglang: GPU {max(ids)} is not among this process's CUDA_VISIBLE_DEVICES={','.join(parent)}")
    return ",".join(parent[i] for i in ids)
