"""Registry of model-family adapters (HF <-> Megatron), one per family.

An adapter knows how to build the megatron-core model of its family, translate its config to
and from Hugging Face, and convert weights by name in both directions. Built-in families are
imported lazily (importing megatron-core takes seconds), so `get_adapter("qwen2")` works
without importing `spark_mcore.models.qwen2` first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from spark_mcore.config.loader import ConfigError
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.packed import PackedRows


@runtime_checkable
class ModelAdapter(Protocol):
    """What the trainer, checkpoint and weight-sync code need from a model family.

    Conversion methods take and return FULL tensors (tensor-parallel shards merged) with
    GLOBAL layer indices; `shard_for_tp` / `merge_tp_shards` move between full and shards.
    `mcore_to_hf` / `hf_to_mcore` need the head layout: call them on an adapter bound to a
    ModelConfig (`get_adapter(family, cfg)` or `adapter.bind(cfg)`).
    """

    family: str

    def bind(self, cfg: ModelConfig) -> ModelAdapter: ...

    def transformer_config(self, cfg: ModelConfig, vocab_size: int, tp: int = 1, pp: int = 1,
                           **overrides: Any) -> Any: ...

    def build_model(self, cfg: ModelConfig, vocab_size: int, pre_process: bool = True,
                    post_process: bool = True, **kwargs: Any) -> torch.nn.Module: ...

    def forward(self, model: torch.nn.Module, tokens: torch.Tensor,
                packed: PackedRows | None = None) -> torch.Tensor: ...

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None,
                  pad_token_id: int | None = None, bos_token_id: int | None = None) -> Any: ...

    def model_config_from_hf(self, hf_config: Any) -> ModelConfig: ...

    def mcore_to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]: ...

    def hf_to_mcore(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def shard_for_tp(self, mcore_name: str, full_tensor: torch.Tensor, tp_rank: int,
                     tp_size: int) -> torch.Tensor: ...

    def merge_tp_shards(self, mcore_name: str, shards: list[torch.Tensor]) -> torch.Tensor: ...

    def export_hf_state(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]: ...

    def load_hf_state(self, model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor]) -> None: ...


A = TypeVar("A")

_ADAPTERS: dict[str, Callable[[], Any]] = {}
# Families shipped with spark_mcore: module imported on first use, which registers the family.
_BUILTIN_MODULES: dict[str, str] = {"qwen2": "spark_mcore.models.qwen2",
                                    "qwen2_5_vl": "spark_mcore.models.qwen2_5_vl"}


def register_adapter(family: str) -> Callable[[type[A]], type[A]]:
    """Class decorator: `@register_adapter("qwen2") class Qwen2Adapter: ...`.

    The class must construct with no arguments (an unbound adapter) and satisfy ModelAdapter.
    """
    if not family or not family.isidentifier():
        raise ValueError(f"adapter family {family!r} must be a non-empty identifier")

    def deco(cls: type[A]) -> type[A]:
        existing = _ADAPTERS.get(family)
        if existing is not None and existing is not cls:
            raise ValueError(f"model family {family!r} is already registered by {existing!r}")
        _ADAPTERS[family] = cls
        return cls

    return deco


def list_families() -> list[str]:
    """Registered plus built-in (not yet imported) families, sorted."""
    return sorted(set(_ADAPTERS) | set(_BUILTIN_MODULES))


def get_adapter(family: str, cfg: ModelConfig | None = None) -> ModelAdapter:
    """A fresh adapter for `family`, bound to `cfg` when given (needed by mcore_to_hf/hf_to_mcore)."""
    if family not in _ADAPTERS and family in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[family])
    if family not in _ADAPTERS:
        raise ConfigError(
            f"model.family={family!r} has no adapter; known families: {', '.join(list_families())}"
        )
    adapter = _ADAPTERS[family]()
    return adapter.bind(cfg) if cfg is not None else adapter
