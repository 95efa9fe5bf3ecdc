"""Qwen2.5-VL on megatron-core: the family adapter (model, config, HF <-> Megatron names).

The model is a megatron `GPTModel` (the Qwen2 language model, multimodal rotary embeddings:
`position_embedding_type="mrope"` with the HF `mrope_section`) that on the first pipeline
stage also holds the vision tower as the transformers module
(`Qwen2_5_VisionTransformerPretrainedModel`: window attention, 2-D rotary, patch merger),
whole on every tensor-parallel rank. The first stage embeds the tokens, runs the tower on the
images and writes its outputs at the image-pad positions (row-major, as transformers'
`masked_scatter`); the decoder then runs as for text with 3-D positions [3, B, T]
(`spark_mcore.models.mrope`).

Names: the language model keeps GPTModel's names (`embedding.*`, `decoder.layers.{i}.*`,
`output_layer.weight`, converted exactly as the qwen2 family); the tower is
`vision_model.<transformers name>` (<-> HF `visual.<name>`), replicated under TP.
HF names are read in both spellings: the hub's (`visual.*`, `model.*`, `lm_head.weight`) and
transformers >= 5's in-memory ones (`model.visual.*`, `model.language_model.*`); written in
the hub's (transformers 5 also saves those).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from spark_mcore.config.loader import ConfigError
from spark_mcore.models import mcore_tp, qwen2
from spark_mcore.models.config import ModelConfig, VisionConfig
from spark_mcore.models.mrope import mrope_position_ids
from spark_mcore.models.packed import PackedRows
from spark_mcore.models.registry import register_adapter
from spark_mcore.models.vision import VisionInputs, canonical_hf_name

FAMILY = "qwen2_5_vl"
VISION_PREFIX = "vision_model."  # megatron side
HF_VISION_PREFIX = "visual."     # HF hub side


def _vision(cfg: ModelConfig) -> VisionConfig:
    if cfg.vision is None:
        raise ConfigError(f"model.family={FAMILY!r} needs model.vision (the vision tower's config); "
                          "set model.vision.* or model.hf_path to a Qwen2.5-VL checkpoint")
    return cfg.vision


# ---- config ---------------------------------------------------------------------------------

def transformer_config(cfg: ModelConfig, vocab_size: int, tp: int = 1, pp: int = 1,
                       **overrides: Any) -> Any:
    """The qwen2 TransformerConfig plus `mrope_section`."""
    if overrides.get("sequence_parallel"):
        raise ConfigError(f"model.family={FAMILY!r} does not support sequence parallelism yet "
                          "(image embeddings are written before the sequence is split)")
    overrides.setdefault("mrope_section", list(_vision(cfg).mrope_section))
    return qwen2.transformer_config(cfg, vocab_size, tp, pp, **overrides)


def hf_vision_config(cfg: ModelConfig) -> Any:
    """transformers Qwen2_5_VLVisionConfig of `cfg.vision` (out_hidden_size = LM hidden)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    v = _vision(cfg)
    return Qwen2_5_VLVisionConfig(
        depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
        window_size=v.window_size, tokens_per_second=v.tokens_per_second,
        fullatt_block_indexes=list(v.fullatt_block_indexes), hidden_act=v.hidden_act,
        out_hidden_size=cfg.hidden_size, initializer_range=cfg.init_std)


def hf_config(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None,
              pad_token_id: int | None = None, bos_token_id: int | None = None) -> Any:
    """transformers Qwen2_5_VLConfig for `cfg`."""
    from transformers import Qwen2_5_VLConfig

    v = _vision(cfg)
    text = qwen2.hf_config(dataclasses.replace(cfg, vision=None), vocab_size, eos_token_id,
                           pad_token_id, bos_token_id).to_dict()
    for key in ("architectures", "model_type", "transformers_version", "rope_theta"):
        text.pop(key, None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta,
                               "mrope_section": list(v.mrope_section)}
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=hf_vision_config(cfg).to_dict(),
        image_token_id=v.image_token_id, video_token_id=v.video_token_id,
        vision_start_token_id=v.vision_start_token_id, vision_end_token_id=v.vision_end_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, dtype=qwen2._HF_DTYPES[cfg.dtype],
        architectures=["Qwen2_5_VLForConditionalGeneration"])


def model_config_from_hf(hf: Any, dtype: str = "fp32") -> ModelConfig:
    """ModelConfig (family qwen2_5_vl) from a transformers Qwen2_5_VLConfig."""
    text, vis = hf.text_config, hf.vision_config
    params = getattr(text, "rope_parameters", None) or {}
    section = params.get("mrope_section")
    if not section:
        raise ConfigError("HF text_config.rope_parameters has no mrope_section (not a Qwen2.5-VL config?)")
    base = qwen2.model_config_from_hf(text, dtype)
    vision = VisionConfig(
        depth=int(vis.depth), hidden_size=int(vis.hidden_size),
        intermediate_size=int(vis.intermediate_size), num_heads=int(vis.num_heads),
        in_channels=int(vis.in_channels), patch_size=int(vis.patch_size),
        spatial_merge_size=int(vis.spatial_merge_size),
        temporal_patch_size=int(vis.temporal_patch_size), window_size=int(vis.window_size),
        tokens_per_second=int(vis.tokens_per_second),
        fullatt_block_indexes=[int(i) for i in vis.fullatt_block_indexes],
        hidden_act=str(vis.hidden_act), mrope_section=[int(s) for s in section],
        image_token_id=int(hf.image_token_id), video_token_id=int(hf.video_token_id),
        vision_start_token_id=int(hf.vision_start_token_id),
        vision_end_token_id=int(hf.vision_end_token_id))
    if int(vis.out_hidden_size) != base.hidden_size:
        raise ConfigError(f"HF vision_config.out_hidden_size={vis.out_hidden_size} != text "
                          f"hidden_size={base.hidden_size}")
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    return dataclasses.replace(base, family=FAMILY, vision=vision, tie_word_embeddings=tied)


# ---- the model ------------------------------------------------------------------------------

@contextmanager
def _mrope_on_cpu() -> Iterator[None]:
    """megatron's MultimodalRotaryEmbedding allocates its frequencies on
    `torch.cuda.current_device()`; without CUDA, let that name the CPU while it is built."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]


def build_vision_tower(cfg: ModelConfig) -> torch.nn.Module:
    """The transformers Qwen2.5-VL vision tower (random weights) in cfg.dtype."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_vision_config(cfg))
    return tower.to(qwen2._DTYPES[cfg.dtype])


class Qwen2_5_VLGPTModel(GPTModel):
    """GPTModel + (first stage) the vision tower; forward takes 3-D positions and images."""

    def __init__(self, *args: Any, model_cfg: ModelConfig, **kwargs: Any) -> None:
        with _mrope_on_cpu():
            super().__init__(*args, **kwargs)
        vision = _vision(model_cfg)
        self.image_token_id = vision.image_token_id
        self.spatial_merge_size = vision.spatial_merge_size
        self.vision_model = build_vision_tower(model_cfg) if self.pre_process else None
        if self.vision_model is not None:
            _sync_across_tp(self.vision_model)
            if model_cfg.freeze_vision:
                self.vision_model.requires_grad_(False)

    def embed_inputs(self, input_ids: Tensor, images: VisionInputs | None) -> Tensor:
        """[B, T] tokens (+ images) -> decoder input [T, B, H] (as LanguageModelEmbedding)."""
        emb = self.embedding.word_embeddings(input_ids)  # [B, T, H], all-reduced over TP
        is_image = input_ids == self.image_token_id
        n_tokens = int(is_image.sum())
        if images is not None:
            assert self.vision_model is not None
            tower_dtype = next(self.vision_model.parameters()).dtype
            feats = self.vision_model(images.pixel_values.to(tower_dtype),
                                      grid_thw=images.image_grid_thw, return_dict=True).pooler_output
            if feats.shape[0] != n_tokens:
                raise ValueError(f"{n_tokens} image-pad tokens (id {self.image_token_id}) but the "
                                 f"images give {feats.shape[0]} embeddings")
            emb = emb.masked_scatter(is_image.unsqueeze(-1), feats.to(emb.dtype))
        elif n_tokens:
            raise ValueError(f"{n_tokens} image-pad tokens (id {self.image_token_id}) but no images")
        emb = emb.transpose(0, 1).contiguous()
        if self.config.fp32_residual_connection:
            emb = emb.float()
        return self.embedding.embedding_dropout(emb)

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None,
                decoder_input: Tensor | None = None, labels: Tensor | None = None,
                images: VisionInputs | None = None, **kwargs: Any) -> Tensor:
        """position_ids [3, B, T] (or [B, T]: the same position on all three axes)."""
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if decoder_input is None and self.pre_process:
            decoder_input = self.embed_inputs(input_ids, images)
        return super().forward(input_ids, position_ids, attention_mask,
                               decoder_input=decoder_input, labels=labels, **kwargs)


def _sync_across_tp(module: torch.nn.Module) -> None:
    """The tower is replicated: start every TP rank from TP rank 0's random weights."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return
    if any(p.is_meta for p in module.parameters()):
        return
    group = ps.get_tensor_model_parallel_group()
    src = torch.distributed.get_global_rank(group, 0)
    with torch.no_grad():
        for p in module.parameters():
            torch.distributed.broadcast(p.data, src=src, group=group)


def build_model(cfg: ModelConfig, vocab_size: int, pre_process: bool = True,
                post_process: bool = True, parallel_output: bool = True, use_te: bool = False,
                vp_stage: int | None = None, **config_overrides: Any) -> Qwen2_5_VLGPTModel:
    """As qwen2.build_model (tp / pp from megatron parallel_state), with M-RoPE and the tower."""
    from megatron.core import parallel_state as ps

    initialized = ps.model_parallel_is_initialized()
    tp = ps.get_tensor_model_parallel_world_size() if initialized else 1
    pp = ps.get_pipeline_model_parallel_world_size() if initialized else 1
    config = transformer_config(cfg, vocab_size, tp, pp, **config_overrides)
    return Qwen2_5_VLGPTModel(
        config=config, transformer_layer_spec=qwen2._layer_spec(use_te, cfg.attention), vocab_size=vocab_size,
        max_sequence_length=cfg.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="mrope", rotary_percent=1.0,
        rotary_base=cfg.rope_theta,  # type: ignore[arg-type]
        vp_stage=vp_stage, model_cfg=cfg)


def position_ids_for(model: torch.nn.Module, tokens: Tensor, images: VisionInputs | None,
                     attention_mask: Tensor | None = None) -> Tensor:
    """M-RoPE positions [3, B, T] of a right-padded batch for `model`."""
    inner = mcore_tp.unwrap_model(model)
    grid = images.image_grid_thw if images is not None else None
    pos, _ = mrope_position_ids(tokens, grid, inner.image_token_id, inner.spatial_merge_size,
                                attention_mask)
    return pos


def forward_logits(model: torch.nn.Module, tokens: Tensor, packed: PackedRows | None = None,
                   images: VisionInputs | None = None) -> Tensor:
    """tokens [B, T] (+ images) -> logits [B, T, V/tp] (hidden states [T, B, H] on a stage
    without post_process). Right-padded rows: causal mask, M-RoPE positions per row.
    Packed rows (text only): the block-diagonal mask and per-sequence positions on all axes."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    if packed is not None:
        if images is not None:
            raise NotImplementedError("packed rows with images are not supported yet: set "
                                      "trainer.pack_sequences=false for vision-language runs")
        same_on_all_axes = packed.position_ids.unsqueeze(0).expand(3, -1, -1)
        return model(input_ids=tokens, position_ids=same_on_all_axes,
                     attention_mask=packed.attention_mask())
    positions = position_ids_for(model, tokens, images)
    return model(input_ids=tokens, position_ids=positions, attention_mask=None, images=images)


# ---- weight names ---------------------------------------------------------------------------

def mcore_to_hf(name: str, tensor: Tensor, lay: qwen2.HeadLayout) -> list[tuple[str, Tensor]]:
    """One FULL megatron tensor -> HF (hub-name, tensor) pairs (see qwen2.mcore_to_hf)."""
    if name.startswith(VISION_PREFIX):
        return [(HF_VISION_PREFIX + name[len(VISION_PREFIX):], tensor)]
    return qwen2.mcore_to_hf(name, tensor, lay)


def hf_to_mcore(hf_state: Mapping[str, Tensor], lay: qwen2.HeadLayout,
                fused_norms: bool = False) -> dict[str, Tensor]:
    """HF Qwen2.5-VL state (either spelling) -> FULL megatron tensors. KeyError on a missing,
    duplicated or unknown tensor."""
    canon: dict[str, Tensor] = {}
    for name, t in hf_state.items():
        key = canonical_hf_name(name)
        if key in canon:
            raise KeyError(f"HF state has {key!r} under two names (hub and transformers-5 spelling)")
        canon[key] = t
    vision = {k: v for k, v in canon.items() if k.startswith(HF_VISION_PREFIX)}
    if not vision:
        raise KeyError("HF state has no vision tower (visual.* / model.visual.*); is this a "
                       "Qwen2.5-VL checkpoint?")
    text = {k: v for k, v in canon.items() if not k.startswith(HF_VISION_PREFIX)}
    out = qwen2.hf_to_mcore(text, lay, fused_norms)
    out.update({VISION_PREFIX + k[len(HF_VISION_PREFIX):]: v for k, v in vision.items()})
    return out


def export_hf_state(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """World size 1: (hub name, detached contiguous CPU clone) for every weight."""
    qwen2._require_single_rank()
    lay = qwen2.HeadLayout.from_model(model)
    for name, tensor in mcore_tp.local_state(model).items():
        for hf_name, t in mcore_to_hf(name, tensor.detach(), lay):
            yield hf_name, t.detach().to("cpu", copy=True).contiguous()


def load_hf_state(model: torch.nn.Module, hf_state: Mapping[str, Tensor]) -> None:
    """Copy an HF Qwen2.5-VL state into `model` (this rank's TP shard / PP stage)."""
    from megatron.core import parallel_state as ps

    inner = mcore_tp.unwrap_model(model)
    lay = qwen2.HeadLayout.from_model(inner)
    fused = any(k.endswith("layer_norm_weight") for k in mcore_tp.local_state(inner))
    full = hf_to_mcore(hf_state, lay, fused_norms=fused)
    if getattr(inner, "vision_model", None) is None:  # later pipeline stages hold no tower
        full = {k: v for k, v in full.items() if not k.startswith(VISION_PREFIX)}
    initialized = ps.model_parallel_is_initialized()
    tp_rank = ps.get_tensor_model_parallel_rank() if initialized else 0
    tp_size = ps.get_tensor_model_parallel_world_size() if initialized else 1
    mcore_tp.load_full_mcore_state(inner, full, tp_rank, tp_size, tied=lay.tied)


# ---- the adapter ----------------------------------------------------------------------------

@register_adapter(FAMILY)
class Qwen2_5_VLAdapter:
    """Qwen2.5-VL (vision tower + Qwen2 language model with M-RoPE)."""

    family = FAMILY
    multimodal = True

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        self.cfg = cfg

    def bind(self, cfg: ModelConfig) -> Qwen2_5_VLAdapter:
        return Qwen2_5_VLAdapter(cfg)

    def _layout(self) -> qwen2.HeadLayout:
        if self.cfg is None:
            raise RuntimeError("this conversion needs the head layout: use "
                               f"get_adapter('{FAMILY}', model_cfg) or adapter.bind(model_cfg)")
        return qwen2.HeadLayout.from_model_config(self.cfg)

    transformer_config = staticmethod(transformer_config)
    build_model = staticmethod(build_model)
    forward = staticmethod(forward_logits)
    hf_config = staticmethod(hf_config)
    model_config_from_hf = staticmethod(model_config_from_hf)
    shard_for_tp = staticmethod(mcore_tp.shard_for_tp)
    merge_tp_shards = staticmethod(mcore_tp.merge_tp_shards)
    export_hf_state = staticmethod(export_hf_state)
    load_hf_state = staticmethod(load_hf_state)
    canonical_hf_name = staticmethod(canonical_hf_name)

    def mcore_to_hf(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return mcore_to_hf(name, tensor, self._layout())

    def hf_to_mcore(self, hf_state: Mapping[str, Tensor],
                    fused_norms: bool = False) -> dict[str, Tensor]:
        return hf_to_mcore(hf_state, self._layout(), fused_norms)
