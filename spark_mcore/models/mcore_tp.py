"""Tensor-parallel layout of megatron-core GPT parameters, by name (family-agnostic).

Megatron names (local spec; TE spec adds `*.layer_norm_weight`):
  embedding.word_embeddings.weight          [V, H]       vocab-parallel, dim 0
  decoder.layers.{i}.self_attention.linear_qkv.{weight [G*(Q/G+2)*D, H], bias}  column, dim 0
  decoder.layers.{i}.self_attention.linear_proj.weight  [H, Q*D]    row, dim 1
  decoder.layers.{i}.mlp.linear_fc1.weight  [2F, H] = [gate; up]   column, gate and up split
                                                                    separately (each rank holds
                                                                    [gate_r; up_r])
  decoder.layers.{i}.mlp.linear_fc2.weight  [H, F]       row, dim 1
  norms, row-parallel biases                             replicated
  output_layer.weight                       [V, H]       vocab-parallel, dim 0
  vision_model.*                            (a vision tower, e.g. qwen2_5_vl) replicated
Splitting the qkv rows contiguously gives each rank whole query groups (megatron's layout).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

_COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
_GLU = ("linear_fc1.weight", "linear_fc1.bias")
_ROW = ("linear_proj.weight", "linear_fc2.weight")
_REPLICATED = ("layernorm.weight", "layernorm.bias", "layer_norm_weight", "layer_norm_bias",
               "linear_proj.bias", "linear_fc2.bias")
_KINDS = (("column", _COLUMN), ("glu", _GLU), ("row", _ROW), ("replicated", _REPLICATED))
# Modules kept whole on every TP rank (a vision-language model's vision tower).
_REPLICATED_PREFIXES = ("vision_model.",)
_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def tp_kind(mcore_name: str) -> str:
    """"column" | "glu" | "row" | "replicated" for a megatron parameter name."""
    if mcore_name.startswith(_REPLICATED_PREFIXES):
        return "replicated"
    for kind, suffixes in _KINDS:
        if mcore_name.endswith(suffixes):
            return kind
    raise KeyError(
        f"no tensor-parallel rule for megatron parameter {mcore_name!r}; add its suffix to "
        "spark_mcore/models/mcore_tp.py"
    )


def _check_split(name: str, size: int, tp_size: int, dim: int) -> None:
    if size % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {size} is not divisible by tp={tp_size}")


def _shard_dim(dim: int) -> Callable[[str, torch.Tensor, int, int], torch.Tensor]:
    def shard(name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        _check_split(name, t.shape[dim], size, dim)
        return t.chunk(size, dim=dim)[rank].clone().contiguous()

    return shard


def _shard_glu(name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    gate, up = torch.chunk(t, 2, dim=0)
    _check_split(name, gate.shape[0], size, 0)
    return torch.cat([x.chunk(size, dim=0)[rank] for x in (gate, up)], dim=0).contiguous()


def _shard_replicated(name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.clone().contiguous()


def _merge_glu(shards: list[torch.Tensor]) -> torch.Tensor:
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    gate = torch.cat([h[0] for h in halves], dim=0)
    up = torch.cat([h[1] for h in halves], dim=0)
    return torch.cat([gate, up], dim=0)


_SHARD = {"column": _shard_dim(0), "row": _shard_dim(1), "glu": _shard_glu,
          "replicated": _shard_replicated}
_MERGE = {"column": lambda shards: torch.cat(shards, dim=0).contiguous(),
          "row": lambda shards: torch.cat(shards, dim=1).contiguous(),
          "glu": _merge_glu,
          "replicated": lambda shards: shards[0].clone().contiguous()}


def shard_for_tp(mcore_name: str, full_tensor: torch.Tensor, tp_rank: int,
                 tp_size: int) -> torch.Tensor:
    """Full tensor -> this rank's shard (a contiguous copy; the full tensor is untouched).

    Column: rows [r*N/tp, (r+1)*N/tp). GLU fc1 [2F, H]: [gate[r-th F/tp rows]; up[same]].
    Row: columns [r*K/tp, (r+1)*K/tp). Replicated: the full tensor.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, tp_size={tp_size})")
    return _SHARD[tp_kind(mcore_name)](mcore_name, full_tensor, tp_rank, tp_size)


def merge_tp_shards(mcore_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard_for_tp: shards in tp-rank order -> full tensor."""
    if not shards:
        raise ValueError(f"{mcore_name}: merge_tp_shards got no shards")
    return _MERGE[tp_kind(mcore_name)](list(shards))


def layer_index(name: str) -> int | None:
    """The decoder layer index in a parameter name, or None for non-layer parameters."""
    m = _LAYER_RE.search(name)
    return int(m.group(2)) if m else None


def shift_layer_index(name: str, offset: int) -> str:
    """Rename `...layers.{i}...` to `...layers.{i+offset}...` (local <-> global under PP)."""
    if offset == 0:
        return name
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", name, count=1)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (`.module` chains) down to the GPTModel."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first decoder layer (0 without PP).

    Megatron numbers TransformerLayer.layer_number globally from 1.
    """
    decoder = getattr(unwrap_model(model), "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not layers:
        return 0
    return int(layers[0].layer_number) - 1


def local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state tensors by local name, without `_extra_state` entries."""
    state = unwrap_model(model).state_dict(keep_vars=True)
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


@torch.no_grad()
def load_full_mcore_state(model: torch.nn.Module, full: Mapping[str, torch.Tensor],
                          tp_rank: int = 0, tp_size: int = 1, tied: bool | None = None) -> None:
    """Copy FULL megatron tensors (global layer names) into this rank's model shard.

    With tied embeddings the last pipeline stage's `output_layer.weight` (a copy megatron
    keeps in sync) is filled from `embedding.word_embeddings.weight`.
    """
    inner = unwrap_model(model)
    if tied is None:
        tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
    offset = layer_offset(inner)
    missing: list[str] = []
    for name, param in local_state(inner).items():
        gname = shift_layer_index(name, offset)
        src = full.get(gname)
        if src is None and tied and gname == "output_layer.weight":
            src = full.get("embedding.word_embeddings.weight")
        if src is None:
            missing.append(gname)
            continue
        shard = shard_for_tp(gname, src, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(
                f"{gname}: checkpoint shard {tuple(shard.shape)} != model {tuple(param.shape)} "
                f"(tp_rank={tp_rank}, tp_size={tp_size}); check the model config matches"
            )
        param.copy_(shard.to(dtype=param.dtype, device=param.device))
    if missing:
        raise KeyError(f"weights missing for {len(missing)} parameters, e.g. {missing[:5]}")
