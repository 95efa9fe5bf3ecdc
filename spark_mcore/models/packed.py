"""Forward of a megatron-core GPTModel on packed rows (several sequences per row, no padding
between them), family-agnostic.

Two routes, picked from the model's attention module:
- local (non-TE) spec, the CPU path: an explicit block-diagonal causal boolean mask
  [R, 1, L, L] (True = masked), which megatron's DotProductAttention applies with
  `masked_fill(-10000)` before the softmax, exactly as it applies its default causal mask to a
  padded row. megatron's GPTModel does NOT use `position_ids` for RoPE (it rotates by row
  offset 0..L-1; position_ids feed only learned absolute embeddings), so `rope_positions`
  swaps in rotary angles taken from the per-sequence positions for the duration of the call.
  RoPE is relative, so row offsets would give the same attention scores in exact arithmetic;
  per-sequence positions give the same fp32 angles as the padded row (and as the rollout
  engine), which is what the 1e-5 parity with the padded path rests on.
  megatron's fused causal softmax kernel (masked_softmax_fusion, fp16/bf16 on CUDA) ignores an
  explicit mask, so packed rows require masked_softmax_fusion=False with this spec.
- Transformer Engine spec (GPU): the THD layout with `PackedSeqParams` (cu_seqlens), where TE's
  flash/cuDNN attention and megatron's RoPE restart at every sequence start. The rows are
  flattened to one [1, R*L] sequence. This branch cannot run on the CPU machines this project
  is tested on (TE needs CUDA); it is written from megatron-core's documented interface
  (TEDotProductAttention / GPTModel packed_seq_params) and is untested here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spark_mcore.models import mcore_tp


@dataclass(frozen=True)
class PackedRows:
    """Layout of packed rows R x L (what the model needs besides the token ids).

    position_ids [R, L] long: position of each token inside its own sequence (0 at its start).
    segment_ids  [R, L] long: segment of each token within its row, numbered from 0 per row;
        trailing padding of a row is a segment of its own (it attends only to itself).
    seqlens      [S]    long: lengths of all segments (padding included), row-major; they sum
        to R * L (the THD cu_seqlens are their cumulative sums).
    """

    position_ids: Tensor
    segment_ids: Tensor
    seqlens: Tensor

    def to(self, device: torch.device | str) -> PackedRows:
        return PackedRows(self.position_ids.to(device), self.segment_ids.to(device), self.seqlens.to(device))

    def attention_mask(self) -> Tensor:
        """[R, 1, L, L] bool, True = masked: token i sees token j iff same segment and j <= i."""
        seg = self.segment_ids
        same = seg[:, :, None] == seg[:, None, :]
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        return ~(same & causal).unsqueeze(1)


def uses_te_attention(model: torch.nn.Module) -> bool:
    """Whether the model's core attention is Transformer Engine's (the THD-capable route)."""
    decoder = getattr(mcore_tp.unwrap_model(model), "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not layers:
        return False
    core = getattr(layers[0].self_attention, "core_attention", None)
    return type(core).__name__.startswith("TE")


@contextmanager
def rope_positions(model: torch.nn.Module, position_ids: Tensor) -> Iterator[None]:
    """During the block, the model's rotary embedding returns angles for `position_ids` [R, L]
    as [L, R, 1, D] (megatron's unfused RoPE broadcasts them over heads) instead of [L, 1, 1, D]
    for row offsets. No-op for a model without rotary embeddings."""
    rotary = getattr(mcore_tp.unwrap_model(model), "rotary_pos_emb", None)
    if rotary is None:
        yield
        return
    original = type(rotary).forward

    def by_position(max_seq_len: int, *args: Any, **kwargs: Any) -> Tensor:
        table = original(rotary, int(position_ids.max()) + 1)  # [P, 1, 1, D], same arithmetic
        return table[:, 0][position_ids.t()]                  # [L, R, 1, D]

    rotary.forward = by_position
    try:
        yield
    finally:
        del rotary.forward


def _check_local_spec(model: torch.nn.Module) -> None:
    config = mcore_tp.unwrap_model(model).config
    if getattr(config, "masked_softmax_fusion", False):
        raise ValueError(
            "packed rows on the local (non-TE) spec need masked_softmax_fusion=False: megatron's "
            "fused causal softmax kernel ignores an explicit attention mask; build the model with "
            "masked_softmax_fusion=False (the actor does this when trainer.pack_sequences=true)")
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError("packed rows with context parallelism need the Transformer Engine spec")


def packed_seq_params(packed: PackedRows) -> Any:
    """megatron PackedSeqParams (THD) for the flattened rows: cu_seqlens int32 on the device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = packed.seqlens.to(device=packed.position_ids.device, dtype=torch.int32)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def forward_packed(model: torch.nn.Module, tokens: Tensor, packed: PackedRows) -> Tensor:
    """tokens [R, L] packed rows -> logits [R, L, V/tp] (or, on a pipeline stage without
    post_process, its hidden states: [L, R, H] on the local route, [R*L, 1, H] on THD)."""
    if tokens.shape != packed.position_ids.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and position_ids "
                         f"{tuple(packed.position_ids.shape)} differ")
    if uses_te_attention(model):  # GPU only, untested here (see the module docstring)
        rows, length = tokens.shape
        out = model(input_ids=tokens.reshape(1, -1), position_ids=packed.position_ids.reshape(1, -1),
                    attention_mask=None, packed_seq_params=packed_seq_params(packed))
        # logits come back [1, R*L, V]; a stage without post_process returns [R*L, 1, H]
        return out.reshape(rows, length, -1) if mcore_tp.unwrap_model(model).post_process else out
    _check_local_spec(model)
    with rope_positions(model, packed.position_ids):
        return model(input_ids=tokens, position_ids=packed.position_ids,
                     attention_mask=packed.attention_mask())
