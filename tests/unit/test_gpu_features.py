"""Config-time checks of the GPU paths (FP8, SP, CP, Transformer Engine) and fault 5 (the fused
softmax only when apex's kernels import), with the machine's capabilities stubbed."""

from __future__ import annotations

import types

import pytest

from spark_mcore.config import accel
from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.qwen2 import transformer_config
from spark_mcore.trainer.config import TrainerConfig


@pytest.fixture
def machine(monkeypatch):
    """Pretend modules in `present` import (CUDA too when 'cuda' is in it)."""
    present: set[str] = set()

    def fake_import(name: str) -> object:
        if name in present:
            return types.SimpleNamespace(__version__="9.9")
        raise ModuleNotFoundError(f"No module named '{name}'")

    monkeypatch.setattr(accel, "_import", fake_import)
    monkeypatch.setattr(accel, "cuda_available", lambda: "cuda" in present)
    monkeypatch.setattr(accel, "fp8_capable_gpu", lambda: "fp8_gpu" in present)
    accel.clear_cache()
    yield present
    accel.clear_cache()


def test_fp8_without_te_names_what_to_install(machine) -> None:
    with pytest.raises(ConfigError, match=r"trainer.fp8=hybrid needs Transformer Engine.*transformer-engine\[pytorch\]"):
        load_run_config(None, ["trainer.fp8=hybrid"])
    with pytest.raises(ConfigError, match="model.transformer_impl=local"):
        load_run_config(None, ["trainer.fp8=e4m3", "model.transformer_impl=local"])
    with pytest.raises(ConfigError, match="'e5m2' is not one of"):
        load_run_config(None, ["trainer.fp8=e5m2"])


def test_sp_without_te_fails_at_load_cp_runs_on_the_local_spec(machine) -> None:
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true needs Transformer Engine"):
        load_run_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true"])
    # context parallelism: the local spec's SDPA core all-gathers keys/values (no TE needed)
    assert load_run_config(None, ["parallel.cp=2"]).parallel.cp == 2
    with pytest.raises(ConfigError, match="vision-language model"):
        load_run_config("examples/configs/tiny_vl.yaml", ["parallel.cp=2"])
    with pytest.raises(ConfigError, match="model.transformer_impl=transformer_engine but Transformer Engine"):
        load_run_config(None, ["model.transformer_impl=transformer_engine"])


def test_with_te_fp8_needs_bf16_and_a_capable_gpu(machine) -> None:
    machine.update({"cuda", "transformer_engine.pytorch"})
    assert ModelConfig().use_te() and not ModelConfig(transformer_impl="local").use_te()
    with pytest.raises(ConfigError, match="set model.dtype=bf16"):
        load_run_config(None, ["trainer.fp8=hybrid"])
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        load_run_config(None, ["trainer.fp8=hybrid", "model.dtype=bf16"])
    machine.add("fp8_gpu")
    cfg = load_run_config(None, ["trainer.fp8=hybrid", "model.dtype=bf16", "trainer.fp8_margin=1",
                                 "trainer.fp8_recipe=tensorwise"])
    assert cfg.model.use_te()
    load_run_config(None, ["parallel.cp=2"])
    load_run_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true"])


def test_fp8_fields_map_to_megatron(machine) -> None:
    over = TrainerConfig(fp8="hybrid", fp8_recipe="delayed", fp8_margin=2, fp8_amax_history_len=16,
                         fp8_amax_compute_algo="most_recent").fp8_overrides()
    assert over == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 2, "fp8_amax_history_len": 16,
                    "fp8_amax_compute_algo": "most_recent"}
    tc = transformer_config(ModelConfig(dtype="bf16"), 64, **over)  # megatron accepts every field
    assert (tc.fp8, tc.fp8_margin, tc.fp8_amax_history_len) == ("hybrid", 2, 16)
    assert TrainerConfig().fp8_overrides() == {}


def test_fault5_fused_softmax_only_when_apex_kernels_import(machine) -> None:
    machine.add("cuda")  # CUDA alone used to turn the fusion on
    assert transformer_config(ModelConfig(), 64).masked_softmax_fusion is False
    machine.update(accel.FUSED_SOFTMAX_MODULES)
    accel.clear_cache()
    assert accel.fused_softmax_available()
    machine.discard("cuda")
    assert not accel.fused_softmax_available()
