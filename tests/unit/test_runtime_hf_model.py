"""model.hf_path sets the architecture from the checkpoint's config.json (the cluster configs
name only the path), refuses a family that does not match, and makes its tokenizer the
default data.tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.qwen2 import hf_config
from spark_mcore.runtime import resolve_hf_model


def _hf_dir(tmp_path: Path, tokenizer: bool) -> Path:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    sizes = ModelConfig(hidden_size=48, num_layers=3, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)
    out = tmp_path / "hf"
    Qwen2ForCausalLM(hf_config(sizes, 80, eos_token_id=1, pad_token_id=0)).save_pretrained(out)
    if tokenizer:
        build_tokenizer(out)
    return out


def test_sizes_and_tokenizer_come_from_the_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = _hf_dir(tmp_path, tokenizer=True)
    cfg = resolve_hf_model(load_run_config(None, [f"model.hf_path={hf}", "model.num_layers=7", "model.dtype=fp32"]))
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size,
            m.vocab_size) == (48, 3, 4, 2, 96, 80)
    assert m.dtype == "fp32" and m.hf_path == str(hf)
    assert cfg.data.tokenizer == str(hf)
    assert "model.num_layers=7 ignored" in caplog.text
    # an explicit tokenizer stays
    assert resolve_hf_model(load_run_config(None, [f"model.hf_path={hf}", "data.tokenizer=/x"])).data.tokenizer == "/x"


def test_without_a_tokenizer_the_built_in_one_stays_and_other_families_are_refused(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path, tokenizer=False)
    assert resolve_hf_model(load_run_config(None, [f"model.hf_path={hf}"])).data.tokenizer is None
    with pytest.raises(ConfigError, match="set model.family=qwen2"):
        resolve_hf_model(load_run_config("examples/configs/tiny_vl.yaml", [f"model.hf_path={hf}"]))
    with pytest.raises(ConfigError, match="config.json"):
        resolve_hf_model(load_run_config(None, [f"model.hf_path={tmp_path / 'missing'}"]))
