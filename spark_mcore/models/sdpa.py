"""A core-attention module for megatron's local layer spec that calls torch's
`scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, no [b, h, s, s]
score tensor), in place of megatron's DotProductAttention (baddbmm + softmax + bmm).

Same interface and layout as DotProductAttention: query [sq, b, np, hn], key/value
[sk, b, ng, hn] (GQA: ng groups, np / ng query heads each), optional boolean mask
[b or 1, 1, sq, sk] with True = masked (megatron's convention; the packed-rows path), none =
causal. Returns [sq, b, np * hn]. No dropout (Qwen2 trains without it), no attention bias, no
packed_seq_params (THD needs Transformer Engine).

Context parallelism (C > 1) by all-gather: each CP rank holds its queries, keys and values for
its two load-balanced chunks (`spark_mcore.distributed.context_parallel`); keys and values are
all-gathered to the full sequence and the causal mask is built from the queries' global
positions. Memory for keys/values is that of the full sequence (like Transformer Engine's
`cp_comm_type="all_gather"`); activations and logits stay split. Padded rows only (no mask).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from spark_mcore.distributed.context_parallel import cp_positions, gather_from_cp


class SDPACoreAttention(MegatronModule):
    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        self.cp_group = _cp_group(pg_collection) if config.context_parallel_size > 1 else None
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("SDPACoreAttention has no dropout; set attention_dropout=0")
        kv = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: Any = None, attention_bias: Tensor | None = None,
                packed_seq_params: Any = None) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention: attention_bias / packed_seq_params need Transformer Engine")
        sq, b, heads, hn = query.shape
        causal: Tensor | None = None
        if self.cp_group is not None:
            if attention_mask is not None:
                raise ValueError("SDPACoreAttention: context parallelism takes padded rows only (no explicit mask)")
            key, value, causal = self._gather_kv(key, value)
        groups = key.shape[2]
        if heads != groups:  # GQA: repeat each kv head for its query heads (as megatron does)
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
        if causal is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=self.softmax_scale)
        elif attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(), scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


    def _gather_kv(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Local keys/values [s/C, b, ng, hn] -> full [s, b, ng, hn] and the causal mask
        [s/C, s] (True = attend) of this rank's queries over all positions."""
        group = self.cp_group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        key = gather_from_cp(key, group, dim=0, backward="sum")
        value = gather_from_cp(value, group, dim=0, backward="sum")
        q_pos = cp_positions(key.shape[0], size, rank).to(key.device)
        k_pos = torch.arange(key.shape[0], device=key.device)
        return key, value, k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)


def _cp_group(pg_collection: Any) -> Any:
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    return group


def local_spec_with_sdpa(spec: Any) -> Any:
    """A copy of a megatron local GPT layer spec whose core attention is SDPACoreAttention."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def sdpa_default() -> bool:
    """SDPA's fused kernels pay off on CUDA; on CPU megatron's own path stays the reference."""
    return torch.cuda.is_available()
