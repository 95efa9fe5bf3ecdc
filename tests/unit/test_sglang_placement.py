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


def test_launch_servers_places_and_scrubs(tmp_path, monkeypatch) -> None:
    """launch_servers under a 4-rank torchrun node with 8 GPUs: servers see GPUs 4,5 and 6,7."""
    import json
    import sys

    from spark_mcore.sglang.client import launch_servers

    for k, v in {"LOCAL_WORLD_SIZE": "4", "RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    dump = ("import json, os, sys; keys = ('CUDA_VISIBLE_DEVICES', 'RANK', 'TORCHELASTIC_USE_AGENT_STORE'); "
            "json.dump(dict(argv=sys.argv[1:], **dict((k, os.environ.get(k)) for k in keys)), open(sys.argv[1], 'w'))")
    cmd = ["{python}", "-c", dump, str(tmp_path / "env{index}.json"), "{base_gpu_id}"]
    handles = launch_servers(2, "m", 0, [], tmp_path / "logs", command=cmd, gpus_per_server=2, gpu_count=8,
                             python=sys.executable)
    for h in handles:
        h.process.wait(timeout=30)
    got = [json.loads((tmp_path / f"env{i}.json").read_text()) for i in range(2)]
    assert [g["CUDA_VISIBLE_DEVICES"] for g in got] == ["4,5", "6,7"]
    assert all(g["RANK"] is None and g["TORCHELASTIC_USE_AGENT_STORE"] is None for g in got)
    assert [g["argv"][1] for g in got] == ["0", "0"]  # each server's own GPUs start at 0
    with pytest.raises(ConfigError, match="this node has 8"):
        launch_servers(3, "m", 0, [], tmp_path / "logs", command=cmd, gpus_per_server=2, gpu_count=8)
