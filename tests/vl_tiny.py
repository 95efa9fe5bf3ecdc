"""A tiny random Qwen2.5-VL (HF and our ModelConfig) and image inputs, shared by the VL tests."""

from __future__ import annotations

import torch

from spark_mcore.models.config import ModelConfig, VisionConfig

VOCAB = 128
IMAGE, VIDEO, VSTART, VEND = 120, 121, 122, 123
PATCH, MERGE, TPATCH = 4, 2, 2


def tiny_vl_config(tied: bool = False, layers: int = 2, **over: object) -> ModelConfig:
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                          spatial_merge_size=MERGE, temporal_patch_size=TPATCH, window_size=16,
                          fullatt_block_indexes=[1], mrope_section=[2, 3, 3], image_token_id=IMAGE,
                          video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    kw: dict = dict(family="qwen2_5_vl", vocab_size=VOCAB, hidden_size=64, num_layers=layers,
                    num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, vision=vision)
    kw.update(over)
    return ModelConfig(**kw)


def tiny_hf_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """transformers Qwen2_5_VLForConditionalGeneration of `cfg` with all weights random
    (norms near 1, biases non-zero so that they matter)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from spark_mcore.models.registry import get_adapter

    hf_cfg = get_adapter("qwen2_5_vl", cfg).hf_config(cfg, cfg.vocab_size or VOCAB)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name and cfg.tie_word_embeddings:
                continue
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
    return model


def image_inputs(grids: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [P, 3*TPATCH*PATCH*PATCH] and image_grid_thw [N, 3] for images of
    (h, w) patches each (t = 1)."""
    g = torch.Generator().manual_seed(seed)
    thw = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long)
    patches = int(thw.prod(-1).sum())
    return torch.randn(patches, 3 * TPATCH * PATCH * PATCH, generator=g), thw


def vl_tokens(texts: list[int], grids: list[tuple[int, int]], seed: int) -> torch.Tensor:
    """One row: random text runs of texts[i] tokens with image i (start, pads, end) after run i."""
    g = torch.Generator().manual_seed(seed)
    row: list[int] = []
    for i, n in enumerate(texts):
        row += torch.randint(0, IMAGE, (n,), generator=g).tolist()
        if i < len(grids):
            h, w = grids[i]
            row += [VSTART] + [IMAGE] * (h * w // MERGE**2) + [VEND]
    return torch.tensor([row])
