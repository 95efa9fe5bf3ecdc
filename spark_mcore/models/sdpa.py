"""A core-attention module for megatron's local layer spec that calls torch's
`scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, no [b, h, s, s]
score tensor), in place of megatron's DotProductAttention (baddbmm + softmax + bmm).

Same interface and layout as DotProductAttention: query [sq, b, np, hn], key/value
[sk, b, ng, hn] (GQA: ng groups, np / ng query heads each), optional boolean mask
[b or 1, 1, sq, sk] with True = masked (megatron's convention; the packed-rows path), none =
causal. Returns [sq, b, np * hn]. No dropout (Qwen2 trains without it), no attention bias, no
packed_seq_params (THD needs Transformer Engine), no context parallelism.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


class SDPACoreAttention(MegatronModule):
    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPACoreAttention does not support context parallelism (use Transformer Engine)")
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
        groups = key.shape[2]
        if heads != groups:  # GQA: repeat each kv head for its query heads (as megatron does)
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(), scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


def local_spec_with_sdpa(spec: Any) -> Any:
    """A copy of a megatron local GPT layer spec whose core attention is SDPACoreAttention."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def sdpa_default() -> bool:
    """SDPA's fused kernels pay off on CUDA; on CPU megatron's own path stays the reference."""
    return torch.cuda.is_available()
