"""Streaming access to Hugging Face checkpoint directories (safetensors only).

`SafetensorsReader` opens `model.safetensors` or the shards listed in
`model.safetensors.index.json` lazily (`safe_open` memory-maps a file; `get(name)` copies one
tensor out), and answers names, shapes and dtypes from the file headers without reading any
tensor data. `ShardedSafetensorsWriter` buffers tensors up to `max_shard_bytes` and flushes
them to `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json` (a single
file is written as `model.safetensors`, without an index), so peak memory is one shard.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spark_mcore.config.loader import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Header dtype strings of safetensors -> torch dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Weight formats we do not read; named in the error so the user knows how to fix the input.
_OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5",
                  "flax_model.msgpack")
# Files never copied along with the weights (weights themselves, or too big to be metadata).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".onnx")
_AUX_MAX_BYTES = 64 * 1024**2


class ConversionError(ConfigError):
    """An input to checkpoint conversion is missing, corrupt or unsupported; the message says
    which file or field and how to fix it."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; ConversionError naming `what` when missing or unparsable."""
    if not path.is_file():
        raise ConversionError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{what}: {path} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{what}: {p} is not a directory (check the path)")
    return p


def _weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when there is one."""
    index = hf_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: 'weight_map' is missing or empty; the index is corrupt")
        files = {name: hf_dir / str(f) for name, f in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise ConversionError(f"{index} lists shard files that do not exist: {missing[:3]}; "
                                  "the download is incomplete")
        return files
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        others = [n for n in _OTHER_WEIGHTS if (hf_dir / n).exists()]
        hint = (f" (found {others}: re-save with `model.save_pretrained(dir, "
                "safe_serialization=True)`)") if others else ""
        raise ConversionError(f"{hf_dir} has no *.safetensors weights{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _open(shard).keys():
            if name in files:
                raise ConversionError(f"tensor {name!r} is in both {files[name].name} and "
                                      f"{shard.name}; add a {INDEX_NAME} or remove a file")
            files[name] = shard
    return files


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError is not importable under a stable name
        raise ConversionError(f"{path} is not a readable safetensors file ({e}); "
                              "the file is corrupt or truncated") from e


class SafetensorsReader:
    """Lazy reader over the safetensors weights of one HF checkpoint directory."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.hf_dir = require_dir(hf_dir, "Hugging Face checkpoint")
        self._files = _weight_files(self.hf_dir)
        self._handles: dict[Path, Any] = {}

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = _open(path)
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self._files)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the file header; no tensor data is read."""
        sl = self._handle(self._file(name)).get_slice(name)
        code = sl.get_dtype()
        if code not in _DTYPES:
            raise ConversionError(f"{name}: safetensors dtype {code} is not supported")
        return tuple(int(d) for d in sl.get_shape()), _DTYPES[code]

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Every tensor as a `meta` tensor of its shape and dtype (costs no memory)."""
        out = {}
        for name in self.names():
            shape, dtype = self.shape_dtype(name)
            out[name] = torch.empty(shape, dtype=dtype, device="meta")
        return out

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the (memory-mapped) file."""
        try:
            return self._handle(self._file(name)).get_tensor(name)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"reading {name!r} from {self._file(name)} failed ({e}); "
                                  "the file is corrupt or truncated") from e

    def _file(self, name: str) -> Path:
        if name not in self._files:
            raise KeyError(f"{name!r} is not in the checkpoint at {self.hf_dir}")
        return self._files[name]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Writes tensors as HF safetensors shards of at most `max_shard_bytes` (a single larger
    tensor gets a shard of its own). Call `close()` (or use `with`) to finish the index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards, write the index; returns the shard paths in order."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = [self.out_dir / SINGLE_NAME]
        else:
            final = [self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        for (tmp, names), dst in zip(self._shards, final, strict=True):
            os.replace(tmp, dst)
            weight_map.update({name: dst.name for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self._shards = []
        return final

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        for tmp, _ in self._shards:  # failed midway: leave no half-written shards behind
            tmp.unlink(missing_ok=True)


def aux_files(src_dir: Path) -> list[Path]:
    """Small non-weight files of a checkpoint directory (config, tokenizer, generation config,
    chat template ...), i.e. what has to travel with the weights."""
    out = []
    for p in sorted(src_dir.iterdir()):
        if (p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name != INDEX_NAME
                and not p.name.startswith(".") and p.stat().st_size <= _AUX_MAX_BYTES):
            out.append(p)
    return out


def copy_files(files: Iterable[Path], dst_dir: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy `files` into `dst_dir` (created), except names in `skip`; returns the names copied."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    skipped, copied = set(skip), []
    for p in files:
        if p.name not in skipped:
            shutil.copy2(p, dst_dir / p.name)
            copied.append(p.name)
    return copied
