"""Read a megatron dist checkpoint (torch_dist backend) a few tensors at a time, in one process.

megatron's `dist_checkpointing.load` assumes the requested shards form a regular grid over
the world; with one process it cannot load a single layer of a layer-stacked tensor (it then
expects every grid cell locally). The checkpoint is a torch.distributed.checkpoint (DCP)
directory, so this module reads it with DCP directly: `_SlicePlanner` asks for exactly the
requested region (global offset + shape) of each stored tensor.

Which region holds a parameter comes from the model's own `sharded_state_dict`: `tp1_layout`
builds the TP1/PP1 model on the `meta` device (no memory) and returns its ShardedTensors and
ShardedTensorFactories (e.g. the SwiGLU fc1, stored as separate gate/up pieces).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from spark_mcore.checkpoint.hf_io import ConversionError, read_json, require_dir
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import ModelAdapter

Entry = Any  # megatron ShardedTensor | ShardedTensorFactory
_Request = tuple[str, tuple[int, ...], torch.Tensor]  # (checkpoint key, global offset, buffer)


class _SlicePlanner(DefaultLoadPlanner):
    """Loads given regions of stored tensors into given buffers (nothing else)."""

    def __init__(self, requests: list[_Request]) -> None:
        super().__init__()
        self._requests = requests
        self._buffers = {(key, offset): buf for key, offset, buf in requests}

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        items: list[ReadItem] = []
        for key, offset, buf in self._requests:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=buf.size())
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        index = read_item.dest_index
        buf = self._buffers[(index.fqn, tuple(index.offset))]
        return self.transform_tensor(read_item, buf)


def _pieces(obj: Any) -> list[Any]:
    """The ShardedTensors inside a (nested list/dict of) built factory output."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _pieces(v)]
    if isinstance(obj, (list, tuple)):
        return [p for v in obj for p in _pieces(v)]
    return [obj]


def _assemble(obj: Any, loaded: dict[int, torch.Tensor]) -> Any:
    """Same structure as `obj` with every ShardedTensor replaced by its loaded tensor."""
    if isinstance(obj, dict):
        return {k: _assemble(v, loaded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_assemble(v, loaded) for v in obj)
    return loaded[id(obj)]


def _is_factory(entry: Entry) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return isinstance(entry, ShardedTensorFactory)


class DistCheckpointReader:
    """Reads parameters (as TP1 full tensors) out of a megatron torch_dist checkpoint dir."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = require_dir(model_dir, "megatron dist checkpoint")
        backend = read_json(self.model_dir / "metadata.json", "dist checkpoint metadata")
        if backend.get("sharded_backend") != "torch_dist":
            raise ConversionError(f"{self.model_dir}: sharded_backend="
                                  f"{backend.get('sharded_backend')!r}; only 'torch_dist' is read")
        try:
            self._md = FileSystemReader(str(self.model_dir)).read_metadata()
        except Exception as e:
            raise ConversionError(f"{self.model_dir}/.metadata is unreadable ({e}); the checkpoint "
                                  "is incomplete or corrupt") from e

    def _tensor_md(self, key: str) -> TensorStorageMetadata | None:
        md = self._md.state_dict_metadata.get(key)
        return md if isinstance(md, TensorStorageMetadata) else None

    def dim0(self, key: str, default: int | None = None) -> int | None:
        """Size of dim 0 of the stored tensor `key` (e.g. the vocabulary), or `default`."""
        md = self._tensor_md(key)
        return int(md.size[0]) if md is not None else default

    def dtype(self, key: str) -> torch.dtype | None:
        """Stored dtype of tensor `key`, None when the checkpoint has no such tensor."""
        md = self._tensor_md(key)
        return md.properties.dtype if md is not None else None

    def _request(self, piece: Any, name: str) -> _Request:
        if getattr(piece, "flattened_range", None) is not None:
            raise ConversionError(f"{name}: flattened (optimizer-layout) tensors are not supported")
        md = self._tensor_md(piece.key)
        if md is None:
            raise ConversionError(f"{self.model_dir} has no tensor {piece.key!r} (for {name}): "
                                  "the model config does not match this checkpoint")
        if tuple(md.size) != tuple(piece.global_shape):
            raise ConversionError(
                f"{piece.key}: checkpoint shape {tuple(md.size)} != {tuple(piece.global_shape)} "
                f"expected from the model config (for {name}); the config does not match")
        shape = (1,) * piece.prepend_axis_num + tuple(piece.local_shape)
        return piece.key, tuple(piece.global_offset), torch.empty(shape, dtype=md.properties.dtype)

    def read(self, entries: dict[str, Entry]) -> dict[str, torch.Tensor]:
        """{param name: sharded entry} -> {param name: full tensor}, in one DCP read."""
        built = {name: e.build() if _is_factory(e) else e for name, e in entries.items()}
        requests, loaded = [], {}
        for name, obj in built.items():
            for piece in _pieces(obj):
                req = self._request(piece, name)
                requests.append(req)
                loaded[id(piece)] = req[2].view(tuple(piece.local_shape))
        if requests:
            with warnings.catch_warnings():  # "assuming ... single process": that is the intent
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.load({}, storage_reader=FileSystemReader(str(self.model_dir)),
                         planner=_SlicePlanner(requests), no_dist=True)
        out = {}
        for name, entry in entries.items():
            value = _assemble(built[name], loaded)
            out[name] = entry.merge_fn(value) if _is_factory(entry) else value
        return out


@contextmanager
def _single_model_parallel() -> Iterator[None]:
    """megatron parallel_state at tp = pp = 1 for the duration (initialised here if needed)."""
    from megatron.core import parallel_state as ps

    from spark_mcore.distributed.config import ParallelConfig
    from spark_mcore.distributed.parallel import destroy_distributed, init_distributed

    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1:
            raise ConversionError("megatron -> HF conversion builds a TP1/PP1 layout: run it in "
                                  "a process without tensor/pipeline parallelism")
        yield
        return
    owns_world = not torch.distributed.is_initialized()
    init_distributed(ParallelConfig(backend="gloo"), seed=0)
    try:
        yield
    finally:
        if owns_world:
            destroy_distributed()
        else:
            ps.destroy_model_parallel()


@contextmanager
def tp1_layout(adapter: ModelAdapter, cfg: ModelConfig, vocab_size: int) -> Iterator[dict[str, Entry]]:
    """{param name: ShardedTensor | ShardedTensorFactory} of the TP1/PP1 model (built on meta)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    with _single_model_parallel():
        with torch.device("meta"):
            model = adapter.build_model(cfg, vocab_size, perform_initialization=False,
                                        use_cpu_initialization=True)
        sharded = model.sharded_state_dict(prefix="")
        # ShardedObjects (`_extra_state`) carry no weights.
        yield {name: e for name, e in sharded.items()
               if isinstance(e, (ShardedTensor, ShardedTensorFactory))}
