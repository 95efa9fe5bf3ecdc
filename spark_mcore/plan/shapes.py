"""Model shapes for planning: presets of the Qwen2.5 family and shapes read from an HF config.json.

Only sizes live here (no torch, no megatron): the planner runs on a laptop before a cluster
is booked. Parameter counts follow the HF module layout of Qwen2 / Qwen2.5-VL:

  text layer  = q (h*h + h) + k, v (h*kv*d + kv*d each) + o (h*h) + MLP (3*h*f) + 2 norms (2*h)
  embeddings  = V*h, plus an lm_head V*h unless tied; final norm h
  vision block = qkv (c*3c + 3c) + proj (c*c + c) + MLP (3*c*fv + 2*fv + c) + 2 norms (2*c)
  vision extra = patch conv (3*2*14*14*c) + merger (c + 4c*4c + 4c + 4c*h + h)

with h hidden, kv key/value heads, d head dim, f MLP width, V vocabulary, c the vision width
and fv its MLP width (the merger folds 2x2 patches, so its input is 4c).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spark_mcore.config.loader import ConfigError


@dataclass(frozen=True)
class VisionShape:
    """Qwen2.5-VL vision tower: depth blocks of width hidden, MLP width ffn, patch 14, merge 2x2."""

    depth: int = 32
    hidden: int = 1280
    ffn: int = 3420
    patch: int = 14
    temporal_patch: int = 2

    def params(self, out_hidden: int) -> int:
        c, fv = self.hidden, self.ffn
        block = (c * 3 * c + 3 * c) + (c * c + c) + (3 * c * fv + 2 * fv + c) + 2 * c
        patch_embed = 3 * self.temporal_patch * self.patch * self.patch * c
        merger = c + (4 * c) * (4 * c) + 4 * c + (4 * c) * out_hidden + out_hidden
        return self.depth * block + patch_embed + merger


@dataclass(frozen=True)
class ModelShape:
    """A decoder (and optional vision tower) described by its sizes only."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = False
    vision: VisionShape | None = None

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"model {self.name}: hidden_size={self.hidden} must be divisible by "
                              f"num_attention_heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"model {self.name}: num_key_value_heads={self.kv_heads} must divide "
                              f"num_attention_heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Parameters of one decoder layer (QKV bias, no o/MLP bias, two RMSNorms)."""
        h, kvd = self.hidden, self.kv_heads * self.head_dim
        attn = (h * h + h) + 2 * (h * kvd + kvd) + h * h
        return attn + 3 * h * self.ffn + 2 * h

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def text_params(self) -> int:
        heads = 1 if self.tied else 2
        return self.layers * self.layer_params() + heads * self.embedding_params() + self.hidden

    def vision_params(self) -> int:
        return self.vision.params(self.hidden) if self.vision else 0

    def total_params(self) -> int:
        return self.text_params() + self.vision_params()

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token (whole model, before any TP split)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


PRESETS: dict[str, ModelShape] = {
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064),
    "qwen2.5-vl-7b": ModelShape("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064,
                                vision=VisionShape(ffn=3420)),
    "qwen2.5-vl-32b": ModelShape("qwen2.5-vl-32b", 5120, 64, 40, 8, 27648, 152064,
                                 vision=VisionShape(ffn=3456)),
    "qwen2.5-72b": ModelShape("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064),
}


def _field(cfg: dict, key: str, path: str) -> int:
    if key not in cfg:
        raise ConfigError(f"{path}: missing '{key}' (a Qwen2 / Qwen2.5-VL config.json has it)")
    return int(cfg[key])


def shape_from_hf_config(path: str | Path) -> ModelShape:
    """A ModelShape from an HF config.json (or its directory). VL configs keep the text sizes
    at the top level (transformers 4) or under text_config (transformers 5)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"--hf-config {path}: no config.json there")
    raw = json.loads(p.read_text())
    text = {**raw, **raw.get("text_config", {})}
    vision = None
    if "vision_config" in raw:
        vc = raw["vision_config"]
        vision = VisionShape(depth=int(vc.get("depth", 32)), hidden=int(vc.get("hidden_size", 1280)),
                             ffn=int(vc.get("intermediate_size", 3420)),
                             patch=int(vc.get("patch_size", 14)),
                             temporal_patch=int(vc.get("temporal_patch_size", 2)))
    heads = _field(text, "num_attention_heads", str(p))
    return ModelShape(
        name=p.parent.name or str(p), hidden=_field(text, "hidden_size", str(p)),
        layers=_field(text, "num_hidden_layers", str(p)), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        ffn=_field(text, "intermediate_size", str(p)), vocab=_field(text, "vocab_size", str(p)),
        tied=bool(text.get("tie_word_embeddings", False)), vision=vision)


def resolve_shape(preset: str | None, hf_config: str | None) -> ModelShape:
    """Exactly one of a preset name and an HF config path."""
    if (preset is None) == (hf_config is None):
        raise ConfigError("give exactly one of --preset NAME and --hf-config PATH "
                          f"(presets: {', '.join(PRESETS)})")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[preset]
    return shape_from_hf_config(hf_config)  # type: ignore[arg-type]
