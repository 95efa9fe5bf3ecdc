"""Faults 3 and 4: launched servers land after the trainer's GPUs, see only their own GPUs, and
do not inherit torchrun's rendezvous variables."""

from __future__ import annotations

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.sglang.placement import (
    TORCHRUN_ENV,
    scrubbed_env,
    server_gpu_ids,
    trainer_local_gpus,
    visible_devices,
)


def test_servers_take_the_gpus_after_the_trainer() -> None:
    # 4 trainer ranks on cuda:0..3, two servers of 2 GPUs: 4,5 and 6,7 (never 0..3)
    first = trainer_local_gpus({"LOCAL_WORLD_SIZE": "4"})
    assert server_gpu_ids(2, 2, first, 8) == [[4, 5], [6, 7]]
    assert trainer_local_gpus({}) == 1 and trainer_local_gpus({}, cuda=False) == 0
    with pytest.raises(ConfigError, match=r"need GPUs 4..9, but this node has 8"):
        server_gpu_ids(3, 2, 4, 8)


def test_visible_devices_map_through_the_parent_mask() -> None:
    assert visible_devices([4, 5], {}) == "4,5"
    assert visible_devices([1], {"CUDA_VISIBLE_DEVICES": "2,3"}) == "3"
    assert visible_devices([0], {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == "GPU-aa"
    with pytest.raises(ConfigError, match="not among"):
        visible_devices([2], {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_torchrun_variables_are_scrubbed() -> None:
    parent = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
              "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "x", "PATH": "/bin", "HF_HOME": "/hf"}
    env = scrubbed_env(parent, {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert env == {"PATH": "/bin", "HF_HOME": "/hf", "CUDA_VISIBLE_DEVICES": "4,5"}
    assert {"RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_USE_AGENT_STORE"} <= set(TORCHRUN_ENV)
