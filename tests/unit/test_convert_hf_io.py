"""Streaming safetensors reader / sharded writer used by checkpoint conversion (no megatron)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.checkpoint.hf_io import (
    ConversionError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    aux_files,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 4, generator=g),            # 64 bytes
            "b": torch.randn(8, 4, generator=g),            # 128 bytes
            "c": torch.randn(2, generator=g),               # 8 bytes
            "d": torch.randn(16, 4, generator=g).bfloat16()}  # 128 bytes


def test_writer_splits_at_max_bytes_and_writes_index(tmp_path: Path) -> None:
    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=200) as w:
        for name, t in tensors.items():
            w.add(name, t)
    # a + b + c = 200 bytes fill shard 1 exactly; d (128) starts shard 2.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 328},
                     "weight_map": {"a": "model-00001-of-00002.safetensors",
                                    "b": "model-00001-of-00002.safetensors",
                                    "c": "model-00001-of-00002.safetensors",
                                    "d": "model-00002-of-00002.safetensors"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    with SafetensorsReader(tmp_path) as r:
        assert r.names() == ["a", "b", "c", "d"]
        assert r.shape_dtype("d") == ((16, 4), torch.bfloat16)
        meta = r.meta_state()
        assert meta["b"].device.type == "meta" and tuple(meta["b"].shape) == (8, 4)
        for name, t in tensors.items():
            got = r.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t)


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = _tensors()
    with ShardedSafetensorsWriter(tmp_path) as w:
        for name, t in tensors.items():
            w.add(name, t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=10) as w:
        w.add("x", torch.zeros(3))     # 12 bytes > 10: alone
        w.add("y", torch.zeros(1))     # 4 bytes: new shard (x's is over the limit)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {"x": "model-00001-of-00002.safetensors",
                          "y": "model-00002-of-00002.safetensors"}


def test_writer_rejects_duplicates_and_cleans_up_on_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a' was already written"):
        with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1) as w:
            w.add("a", torch.zeros(2))
            w.add("b", torch.zeros(2))  # flushes a's shard to a temporary file
            w.add("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_reader_errors_name_the_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="is not a directory"):
        SafetensorsReader(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"no \*\.safetensors weights .*safe_serialization=True"):
        SafetensorsReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(ConversionError, match="model.safetensors is not a readable safetensors "
                                              "file .*corrupt or truncated"):
        SafetensorsReader(tmp_path)


def test_reader_index_errors(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConversionError, match=r"shard files that do not exist: "
                                              r"\['model-00002-of-00002.safetensors'\]"):
        SafetensorsReader(tmp_path)
    index.write_text("{not json")
    with pytest.raises(ConversionError, match="is not valid JSON"):
        SafetensorsReader(tmp_path)


def test_aux_files_skip_weights_index_and_hidden(tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "merges.txt", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", ".hidden"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in aux_files(tmp_path)] == ["config.json", "merges.txt", "tokenizer.json"]
