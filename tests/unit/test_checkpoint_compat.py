"""checkpoint.compat: a checkpoint's meta.json against the run, before any tensor is read."""

from __future__ import annotations

import dataclasses

import pytest

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.checkpoint.compat import check_compatible
from spark_mcore.config.loader import ConfigError, to_dict
from spark_mcore.models.config import ModelConfig

CFG = ModelConfig(hidden_size=32, num_layers=4, ffn_hidden_size=64)


def _meta(cfg: ModelConfig = CFG, vocab: int = 64, distributed: bool = False) -> dict:
    """What checkpoint/io.py writes (the layout fields do not matter to the check)."""
    return {"step": 2, "tp": 2, "pp": 1, "family": cfg.family, "vocab_size": vocab,
            "dtype": cfg.dtype, "model": to_dict(cfg), "optimizer": {"distributed": distributed}}


def test_same_model_under_another_layout_is_accepted() -> None:
    check_compatible(_meta(), CFG, 64, optimizer=True)


def test_every_differing_shape_field_is_named_with_its_fix() -> None:
    saved = dataclasses.replace(CFG, hidden_size=64, num_layers=2, tie_word_embeddings=False)
    with pytest.raises(ConfigError) as err:
        check_compatible(_meta(saved), CFG, 64, optimizer=False, where="runs/x/checkpoints/step_2")
    msg = str(err.value)
    assert "runs/x/checkpoints/step_2" in msg
    assert "model.hidden_size: checkpoint 64, this run 32 (--set model.hidden_size=64)" in msg
    assert "model.num_layers: checkpoint 2, this run 4 (--set model.num_layers=2)" in msg
    assert "--set model.tie_word_embeddings=false" in msg
    assert "checkpoint.resume=false" in msg


def test_rope_base_and_vocab_size_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"model.rope_theta: checkpoint 1000000.0") as err:
        check_compatible(_meta(dataclasses.replace(CFG, rope_theta=1e6), vocab=80), CFG, 64, optimizer=False)
    assert "vocab_size: checkpoint 80, this run 64 (--set model.vocab_size=80" in str(err.value)


def test_optimizer_kind_and_dtype_matter_only_when_its_state_is_loaded() -> None:
    meta = _meta(dataclasses.replace(CFG, dtype="bf16"), distributed=True)
    check_compatible(meta, CFG, 64, optimizer=False)  # weights only (a converted model): fine
    with pytest.raises(ConfigError) as err:
        check_compatible(meta, CFG, 64, optimizer=True)
    assert "--set parallel.use_distributed_optimizer=true" in str(err.value)
    assert "model.dtype: checkpoint 'bf16', this run 'fp32' (--set model.dtype=bf16)" in str(err.value)


def test_meta_without_model_fields_is_not_checked() -> None:
    check_compatible({"step": 7, "policy_version": 7, "tp": 1, "pp": 1}, CFG, 64, optimizer=True)
