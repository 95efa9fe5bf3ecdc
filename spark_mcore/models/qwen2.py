"""Qwen2 / Qwen2.5 dense text models on megatron-core, and HF <-> Megatron weight conversion.

Architecture: RMSNorm, SwiGLU MLP (gated_linear_unit + silu, fc1 = [gate; up]), RoPE
(non-interleaved, base rope_theta), GQA, bias on q/k/v only, no dropout.

Megatron's fused qkv weight is grouped per key/value head:
  linear_qkv.weight [G * (Q/G + 2) * D, H] = for each group g: [q heads of g (Q/G * D rows);
  k_g (D rows); v_g (D rows)], with Q query heads, G groups, D head dim, H hidden.
HF keeps q_proj [Q*D, H], k_proj [G*D, H], v_proj [G*D, H]; query head j uses kv head j // (Q/G)
in both, so conversion is a reshape, never a permutation of heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from torch import Tensor

from spark_mcore.config import accel
from spark_mcore.config.loader import ConfigError
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.packed import PackedRows, forward_packed
from spark_mcore.models.registry import register_adapter
from spark_mcore.models.sdpa import local_spec_with_sdpa, sdpa_default

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---- config ---------------------------------------------------------------------------------

def _check_divisible(cfg: ModelConfig, vocab_size: int, tp: int, pp: int, vpp: int | None = None) -> None:
    checks = (("vocab_size", vocab_size, tp, "parallel.tp"),
              ("model.num_attention_heads", cfg.num_attention_heads, tp, "parallel.tp"),
              ("model.num_query_groups", cfg.num_query_groups, tp, "parallel.tp"),
              ("model.ffn_hidden_size", cfg.ffn_hidden_size, tp, "parallel.tp"),
              ("model.num_layers", cfg.num_layers, pp * (vpp or 1),
               "parallel.pp * parallel.virtual_pipeline_size" if vpp else "parallel.pp"))
    if vocab_size <= 0:
        raise ConfigError(f"vocab_size={vocab_size} must be > 0 (model.vocab_size or tokenizer size)")
    for field, value, div, by in checks:
        if value % div:
            raise ConfigError(f"{field}={value} must be divisible by {by}={div}")


def transformer_config(cfg: ModelConfig, vocab_size: int, tp: int = 1, pp: int = 1,
                       **overrides: Any) -> TransformerConfig:
    """megatron TransformerConfig for a Qwen2 model; `overrides` win over the defaults."""
    _check_divisible(cfg, vocab_size, tp, pp, overrides.get("virtual_pipeline_model_parallel_size"))
    dtype = _DTYPES[cfg.dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.dtype == "bf16",
        fp16=cfg.dtype == "fp16",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        # megatron imports apex's softmax kernels when this is on (fault 5): only when they import
        masked_softmax_fusion=accel.fused_softmax_available(),
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _layer_spec(use_te: bool, attention: str = "megatron", cp: int = 1) -> Any:
    if not use_te:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if cp > 1 and attention == "megatron":  # megatron's DotProductAttention asserts cp == 1
            raise ConfigError("parallel.cp > 1 with model.attention=megatron: the local spec's context "
                              "parallelism is in the sdpa core; set model.attention=sdpa (or auto)")
        if attention == "sdpa" or (attention == "auto" and (sdpa_default() or cp > 1)):
            spec = local_spec_with_sdpa(spec)
        return spec
    if not (accel.cuda_available() and accel.te_available()):
        raise ConfigError("use_te=True needs CUDA and Transformer Engine "
                          f"({accel.probe('transformer_engine.pytorch')[1]}); set model.transformer_impl=local")
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec()


def build_model(cfg: ModelConfig, vocab_size: int, pre_process: bool = True,
                post_process: bool = True, parallel_output: bool = True, use_te: bool = False,
                vp_stage: int | None = None, **config_overrides: Any) -> GPTModel:
    """A GPTModel (one pipeline stage, or one virtual-pipeline chunk of it) with the local
    (non-TE) layer spec unless `use_te`.

    tp / pp sizes come from megatron parallel_state (call init_distributed first).
    parallel_output=True: logits are vocab-parallel [B, T, V/tp] (use vocab-parallel
    log-probs); False gathers the full vocabulary on every TP rank.
    vp_stage: the chunk's virtual stage; megatron then builds the chunk's layers with their
    global numbers (needs virtual_pipeline_model_parallel_size in `config_overrides`).
    """
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    config = transformer_config(cfg, vocab_size, tp, pp, **config_overrides)
    return GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(use_te, cfg.attention, config.context_parallel_size),
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rope_theta,  # type: ignore[arg-type]  # annotated int, used as float
        vp_stage=vp_stage,
    )


def forward_logits(model: torch.nn.Module, tokens: Tensor, packed: PackedRows | None = None) -> Tensor:
    """tokens [B, T] long -> logits [B, T, V] (V/tp when built with parallel_output=True).

    With `packed`, the rows hold several sequences each (`spark_mcore.models.packed`).

    The call is `model(input_ids=tokens, position_ids=arange(T) per row, attention_mask=None)`:
    with attention_mask=None the local spec applies its default causal mask, which is exact for
    right-padded batches (padding only follows real tokens). GPTModel works in [T, B, ...]
    internally and transposes logits back to [B, T, V]. On a pipeline stage without
    post_process the result is instead the stage's hidden states [T, B, H] (what the schedule
    sends to the next stage).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    if packed is not None:
        return forward_packed(model, tokens, packed)
    b, t = tokens.shape
    position_ids = torch.arange(t, device=tokens.device).unsqueeze(0).expand(b, t)
    return model(input_ids=tokens, position_ids=position_ids, attention_mask=None)


def hf_config(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None,
              pad_token_id: int | None = None, bos_token_id: int | None = None) -> Any:
    """transformers.Qwen2Config for `cfg` (rope_theta in both the transformers-5
    `rope_parameters` and the 4.x `rope_theta` spelling)."""
    from transformers import Qwen2Config

    if not cfg.qkv_bias:
        raise ConfigError("model.qkv_bias=false has no Qwen2 HF equivalent (q/k/v always have a bias)")
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        use_sliding_window=False,
        max_window_layers=cfg.num_layers,
        attention_dropout=0.0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        dtype=_HF_DTYPES[cfg.dtype],
        architectures=["Qwen2ForCausalLM"],
    )


def _hf_rope_theta(hf: Any) -> float:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"HF rope type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    return float(theta) if theta is not None else 10000.0


def model_config_from_hf(hf: Any, dtype: str = "fp32") -> ModelConfig:
    """ModelConfig (family qwen2) from a transformers Qwen2Config (or any object with its fields)."""
    if getattr(hf, "use_sliding_window", False):
        raise ConfigError("HF config use_sliding_window=true is not supported")
    heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and int(head_dim) * heads != int(hf.hidden_size):
        raise ConfigError(f"HF head_dim={head_dim} != hidden_size / num_attention_heads")
    return ModelConfig(
        family="qwen2",
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        num_layers=int(hf.num_hidden_layers),
        num_attention_heads=heads,
        num_query_groups=int(getattr(hf, "num_key_value_heads", None) or heads),
        ffn_hidden_size=int(hf.intermediate_size),
        max_position_embeddings=int(hf.max_position_embeddings),
        rope_theta=_hf_rope_theta(hf),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=True,
        init_std=float(getattr(hf, "initializer_range", 0.02)),
        dtype=dtype,  # type: ignore[arg-type]
    )


# ---- weight names ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadLayout:
    """Q query heads, G kv groups, D head dim, and whether lm_head is tied to the embedding."""

    num_heads: int
    num_groups: int
    head_dim: int
    tied: bool

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> HeadLayout:
        return cls(cfg.num_attention_heads, cfg.num_query_groups,
                   cfg.hidden_size // cfg.num_attention_heads, cfg.tie_word_embeddings)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> HeadLayout:
        inner = mcore_tp.unwrap_model(model)
        c = inner.config
        return cls(c.num_attention_heads, c.num_query_groups or c.num_attention_heads,
                   c.kv_channels, bool(inner.share_embeddings_and_output_weights))


_GLOBAL = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight",
           "output_layer.weight": "lm_head.weight"}
# Per layer, one-to-one. Both the local-spec norm names and TE's fused names map to HF.
_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
          "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
          "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
          "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
          "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
          "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
_LOCAL_SPEC_NORMS = {"input_layernorm.weight": "input_layernorm.weight",
                     "post_attention_layernorm.weight": "pre_mlp_layernorm.weight"}
_TE_SPEC_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                  "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_HF_IGNORED = ("rotary_emb.inv_freq",)


def split_qkv(fused: Tensor, lay: HeadLayout) -> tuple[Tensor, Tensor, Tensor]:
    """linear_qkv weight [G*(Q/G+2)*D, H] (or bias [G*(Q/G+2)*D]) -> q [Q*D, ...], k, v [G*D, ...]."""
    per = lay.num_heads // lay.num_groups
    rest = fused.shape[1:]
    expected = lay.num_groups * (per + 2) * lay.head_dim
    if fused.shape[0] != expected:
        raise ValueError(f"linear_qkv has {fused.shape[0]} rows, expected {expected} for {lay}")
    g = fused.reshape(lay.num_groups, per + 2, lay.head_dim, *rest)
    q = g[:, :per].reshape(lay.num_heads * lay.head_dim, *rest)
    k = g[:, per].reshape(lay.num_groups * lay.head_dim, *rest)
    v = g[:, per + 1].reshape(lay.num_groups * lay.head_dim, *rest)
    return q.clone(), k.clone(), v.clone()


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, lay: HeadLayout) -> Tensor:
    """Inverse of split_qkv: q [Q*D, ...], k/v [G*D, ...] -> [G*(Q/G+2)*D, ...]."""
    per = lay.num_heads // lay.num_groups
    rest = q.shape[1:]
    qg = q.reshape(lay.num_groups, per, lay.head_dim, *rest)
    kg = k.reshape(lay.num_groups, 1, lay.head_dim, *rest)
    vg = v.reshape(lay.num_groups, 1, lay.head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def mcore_to_hf(name: str, tensor: Tensor, lay: HeadLayout) -> list[tuple[str, Tensor]]:
    """One FULL megatron tensor (global layer index) -> HF (name, tensor) pairs.

    `_extra_state` entries and a tied output_layer give []; unknown names raise KeyError.
    """
    if name.endswith("_extra_state") or (lay.tied and name == "output_layer.weight"):
        return []
    if name in _GLOBAL:
        return [(_GLOBAL[name], tensor)]
    layer = mcore_tp.layer_index(name)
    prefix = f"decoder.layers.{layer}."
    if layer is None or not name.startswith(prefix):
        raise KeyError(f"no Qwen2 HF name for megatron parameter {name!r}")
    suffix, hf = name[len(prefix):], f"model.layers.{layer}."
    if suffix in _LAYER:
        return [(hf + _LAYER[suffix], tensor)]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor, lay)
        return [(f"{hf}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    if suffix == "mlp.linear_fc1.weight":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(hf + "mlp.gate_proj.weight", gate.clone()), (hf + "mlp.up_proj.weight", up.clone())]
    raise KeyError(f"no Qwen2 HF name for megatron parameter {name!r}")


def _pop(hf_state: dict[str, Tensor], name: str) -> Tensor:
    if name not in hf_state:
        raise KeyError(f"HF state is missing {name!r}; is this a Qwen2 checkpoint of this size?")
    return hf_state.pop(name)


def _hf_layer_to_mcore(hf: dict[str, Tensor], i: int, lay: HeadLayout,
                       norms: Mapping[str, str]) -> dict[str, Tensor]:
    src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {dst + mc: _pop(hf, src + h) for h, mc in norms.items()}
    out[dst + "self_attention.linear_proj.weight"] = _pop(hf, src + "self_attn.o_proj.weight")
    out[dst + "mlp.linear_fc2.weight"] = _pop(hf, src + "mlp.down_proj.weight")
    for kind in ("weight", "bias"):
        names = [f"{src}self_attn.{p}_proj.{kind}" for p in "qkv"]
        if kind == "bias" and names[0] not in hf:
            continue  # qkv_bias=False
        q, k, v = (_pop(hf, n) for n in names)
        out[f"{dst}self_attention.linear_qkv.{kind}"] = fuse_qkv(q, k, v, lay)
    gate, up = _pop(hf, src + "mlp.gate_proj.weight"), _pop(hf, src + "mlp.up_proj.weight")
    out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    return out


def hf_to_mcore(hf_state: Mapping[str, Tensor], lay: HeadLayout,
                fused_norms: bool = False) -> dict[str, Tensor]:
    """HF Qwen2 state -> FULL megatron tensors with global layer names.

    fused_norms=True names the layer norms as the TE spec does (linear_qkv.layer_norm_weight,
    linear_fc1.layer_norm_weight). With tied embeddings `lm_head.weight` is ignored if present.
    Raises KeyError on a missing or an unconsumed HF tensor.
    """
    hf = {k: v for k, v in hf_state.items() if not k.endswith(_HF_IGNORED)}
    if lay.tied:
        hf.pop("lm_head.weight", None)
    out = {mc: _pop(hf, h) for mc, h in _GLOBAL.items() if not (lay.tied and h == "lm_head.weight")}
    layers = sorted({i for k in hf if (i := mcore_tp.layer_index(k)) is not None})
    if layers != list(range(len(layers))):
        raise KeyError(f"HF layer indices are not contiguous from 0: {layers}")
    norms = _TE_SPEC_NORMS if fused_norms else _LOCAL_SPEC_NORMS
    for i in layers:
        out.update(_hf_layer_to_mcore(hf, i, lay, norms))
    if hf:
        raise KeyError(f"HF tensors not understood by the qwen2 adapter: {sorted(hf)[:5]}")
    return out


# ---- whole models ---------------------------------------------------------------------------

def _require_single_rank() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size() > 1
        or ps.get_pipeline_model_parallel_world_size() > 1
    ):
        raise RuntimeError(
            "export_hf_state works on a whole model (tp=pp=1); under TP/PP gather the shards "
            "with merge_tp_shards and map global names with mcore_to_hf"
        )


def export_hf_state(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """World size 1: yield (HF name, tensor) for every weight; tensors are detached, contiguous
    CPU clones (safe to keep while the model trains on)."""
    _require_single_rank()
    lay = HeadLayout.from_model(model)
    for name, tensor in mcore_tp.local_state(model).items():
        for hf_name, t in mcore_to_hf(name, tensor.detach(), lay):
            yield hf_name, t.detach().to("cpu", copy=True).contiguous()


def load_hf_state(model: torch.nn.Module, hf_state: Mapping[str, Tensor]) -> None:
    """Copy an HF Qwen2 state into `model` (this rank's TP shard / PP stage)."""
    from megatron.core import parallel_state as ps

    inner = mcore_tp.unwrap_model(model)
    lay = HeadLayout.from_model(inner)
    fused = any(k.endswith("layer_norm_weight") for k in mcore_tp.local_state(inner))
    full = hf_to_mcore(hf_state, lay, fused_norms=fused)
    initialized = ps.model_parallel_is_initialized()
    tp_rank = ps.get_tensor_model_parallel_rank() if initialized else 0
    tp_size = ps.get_tensor_model_parallel_world_size() if initialized else 1
    mcore_tp.load_full_mcore_state(inner, full, tp_rank, tp_size, tied=lay.tied)


# ---- the adapter ----------------------------------------------------------------------------

@register_adapter("qwen2")
class Qwen2Adapter:
    """Qwen2 / Qwen2.5 dense text. Bind a ModelConfig for the name-level conversions."""

    family = "qwen2"

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        self.cfg = cfg

    def bind(self, cfg: ModelConfig) -> Qwen2Adapter:
        return Qwen2Adapter(cfg)

    def _layout(self) -> HeadLayout:
        if self.cfg is None:
            raise RuntimeError("this conversion needs the head layout: use "
                               "get_adapter('qwen2', model_cfg) or adapter.bind(model_cfg)")
        return HeadLayout.from_model_config(self.cfg)

    transformer_config = staticmethod(transformer_config)
    build_model = staticmethod(build_model)
    forward = staticmethod(forward_logits)
    hf_config = staticmethod(hf_config)
    model_config_from_hf = staticmethod(model_config_from_hf)
    shard_for_tp = staticmethod(mcore_tp.shard_for_tp)
    merge_tp_shards = staticmethod(mcore_tp.merge_tp_shards)
    export_hf_state = staticmethod(export_hf_state)
    load_hf_state = staticmethod(load_hf_state)

    def mcore_to_hf(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return mcore_to_hf(name, tensor, self._layout())

    def hf_to_mcore(self, hf_state: Mapping[str, Tensor],
                    fused_norms: bool = False) -> dict[str, Tensor]:
        return hf_to_mcore(hf_state, self._layout(), fused_norms)
