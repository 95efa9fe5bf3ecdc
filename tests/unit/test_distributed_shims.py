"""CPU shims for megatron-core and the world-size-1 process-group setup."""

from __future__ import annotations

import pytest
import torch

from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed import cpu_shims
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import (
    destroy_distributed,
    find_free_port,
    init_distributed,
    resolve_backend,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only shims")


def test_apply_is_idempotent_and_scoped() -> None:
    assert cpu_shims.apply_cpu_shims() is True
    assert cpu_shims.apply_cpu_shims() is True
    from megatron.core import utils as mutils
    from megatron.core.pipeline_parallel import schedules

    assert isinstance(mutils.torch, cpu_shims._CpuTorch)
    assert mutils.torch is schedules.torch  # one proxy, installed once
    assert mutils.torch.cuda.current_device() == torch.device("cpu")
    assert mutils.torch.zeros(2, device="cuda").device.type == "cpu"
    assert mutils.torch.Tensor is torch.Tensor
    assert not isinstance(torch.cuda, cpu_shims._CpuCuda)  # the real torch is untouched
    buf = mutils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"


def test_rng_tracker_forks_cpu_generator() -> None:
    cpu_shims.apply_cpu_shims()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("a", 11)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(3)
    after = torch.rand(3)  # default stream is unaffected by the fork
    torch.manual_seed(11)
    assert torch.equal(first, torch.rand(3))
    assert torch.equal(after, expected_default)
    with tracker.fork("a"):  # the tracked stream advanced
        second = torch.rand(3)
    torch.manual_seed(11)
    torch.rand(3)
    assert torch.equal(second, torch.rand(3))


def test_clip_grad_hand_computed() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    cpu_shims.clip_grad_by_total_norm_fp32_cpu([p], max_norm=1.0, total_norm=5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    q = torch.nn.Parameter(torch.zeros(1))
    q.grad = torch.tensor([0.5])
    cpu_shims.clip_grad_by_total_norm_fp32_cpu([q], max_norm=1.0, total_norm=0.5)
    assert q.grad.item() == 0.5  # below the limit: untouched
    from megatron.core.optimizer import optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is cpu_shims.clip_grad_by_total_norm_fp32_cpu


def test_cpu_tensor_type_reads_as_cuda_only_inside_the_block() -> None:
    t = torch.zeros(2)
    with cpu_shims._cpu_tensor_type_reads_as_cuda():
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"
        assert t.type(torch.float64).dtype == torch.float64  # conversions unchanged
    assert t.type() == "torch.FloatTensor"
    cpu_shims.apply_cpu_shims()
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    assert getattr(cls.__init__, "_spark_cpu_shim", False)
    assert isinstance(distrib_optimizer.torch, cpu_shims._CpuTorch)


class _FakeDistOpt:
    """What the torch-Adam wrappers read of a DistributedOptimizer: `.optimizer`."""

    def __init__(self) -> None:
        self.params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
        self.optimizer = torch.optim.Adam(self.params, lr=0.1)

    def state_dict(self) -> list[float]:
        return sorted(float(s["step"]) for s in self.optimizer.state.values())

    def load_state_dict(self, step: float) -> None:
        shared = torch.tensor(step)  # megatron's load gives every parameter this one tensor
        for p in self.params:
            self.optimizer.state[p] = {"step": shared}


def test_torch_adam_step_wrappers() -> None:
    fake = _FakeDistOpt()
    state_dict = cpu_shims._state_dict_with_initial_adam_state(_FakeDistOpt.state_dict)
    assert state_dict(fake) == [0.0, 0.0]  # never stepped: the state Adam's first step creates
    assert all(float(s["exp_avg"].abs().sum()) == 0 for s in fake.optimizer.state.values())
    cpu_shims._load_state_dict_unsharing_steps(_FakeDistOpt.load_state_dict)(fake, 3.0)
    steps = [s["step"] for s in fake.optimizer.state.values()]
    assert steps[0] is not steps[1] and [float(s) for s in steps] == [3.0, 3.0]
    steps[0].add_(1)  # torch's Adam increments each parameter's step in place
    assert state_dict(fake) == [3.0, 4.0]


def test_check_dist_checkpointing_ready(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = cpu_shims.check_dist_checkpointing_ready(tmp_path / "a" / "b")
    assert out.is_dir()


def test_init_and_destroy_world_of_one() -> None:
    state = init_distributed(ParallelConfig(), seed=5)
    try:
        assert (state.rank, state.world_size, state.tp_size, state.pp_size, state.dp_size) \
            == (0, 1, 1, 1, 1)
        assert state.is_first_stage and state.is_last_stage
        assert state.backend == "gloo" and state.device == torch.device("cpu")
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        assert getattr(type(get_cuda_rng_tracker()), "_spark_cpu_shim", False)
        with get_cuda_rng_tracker().fork():
            torch.rand(1)
    finally:
        destroy_distributed()
    destroy_distributed()  # second call is a no-op
    assert not torch.distributed.is_initialized()


def test_layout_errors() -> None:
    with pytest.raises(ConfigError, match="not divisible by parallel.tp \\* parallel.pp"):
        init_distributed(ParallelConfig(tp=2))
    destroy_distributed()
    with pytest.raises(ConfigError, match="parallel.backend='mpi'"):
        resolve_backend("mpi")
    assert resolve_backend("auto") == "gloo"
    assert 0 < find_free_port() < 65536
