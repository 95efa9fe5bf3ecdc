"""Can this run load that checkpoint? Checks a checkpoint's meta.json against the run's model
and optimizer before any tensor is read.

A dist checkpoint stores global tensors, so the TP/PP layout that wrote it does not matter
(megatron reshards on load). What does matter is everything that fixes a tensor's global shape
or meaning: a mismatch there would otherwise surface as a shape error deep inside
torch.distributed.checkpoint, or (for RoPE base, norm epsilon) not at all. Each error names the
field and the override that fixes it. Megatron-free, so it is cheap to unit-test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from spark_mcore.config.loader import ConfigError
from spark_mcore.models.config import ModelConfig

__all__ = ["SHAPE_FIELDS", "FUNCTION_FIELDS", "check_compatible"]

# ModelConfig fields that fix the global shape of some checkpoint tensor.
SHAPE_FIELDS = ("family", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "tie_word_embeddings", "qkv_bias")
# Fields that leave shapes alone but change the function the weights were trained for.
FUNCTION_FIELDS = ("rope_theta", "rms_norm_eps")


_FIX = ("set those to the checkpoint's values to resume from it, or start a new run instead "
        "(checkpoint.resume=false, or another checkpoint.dir)")


def _text(value: Any) -> str:
    """A value as a `--set key=value` override spells it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _model_mismatches(saved: dict[str, Any], model_cfg: ModelConfig) -> list[str]:
    """`field: checkpoint X, run Y (--set model.field=X)` lines; fields an older meta.json
    lacks are not checked."""
    lines = []
    for field in (*SHAPE_FIELDS, *FUNCTION_FIELDS):
        if field not in saved:
            continue
        ours = getattr(model_cfg, field)
        theirs = saved[field]
        same = (math.isclose(float(theirs), ours, rel_tol=1e-9) if isinstance(ours, float)
                else theirs == ours)
        if not same:
            lines.append(f"model.{field}: checkpoint {theirs!r}, this run {ours!r} "
                         f"(--set model.{field}={_text(theirs)})")
    return lines


def _optimizer_mismatches(meta: dict[str, Any], model_cfg: ModelConfig,
                          distributed_optimizer: bool) -> list[str]:
    """The optimizer state layout differs between the plain and the distributed optimizer, and
    between fp32 (Adam on the parameters) and bf16/fp16 (fp32 main copies): both must match."""
    lines = []
    saved_dist = bool((meta.get("optimizer") or {}).get("distributed", False))
    if saved_dist != bool(distributed_optimizer):
        lines.append(f"parallel.use_distributed_optimizer: checkpoint {saved_dist}, this run "
                     f"{bool(distributed_optimizer)} (--set parallel.use_distributed_optimizer="
                     f"{_text(saved_dist)}); the two optimizers store their state differently")
    saved_dtype = meta.get("dtype", (meta.get("model") or {}).get("dtype"))
    if saved_dtype is not None and saved_dtype != model_cfg.dtype:
        lines.append(f"model.dtype: checkpoint {saved_dtype!r}, this run {model_cfg.dtype!r} "
                     f"(--set model.dtype={saved_dtype}); its optimizer state is for {saved_dtype}")
    return lines


def check_compatible(meta: dict[str, Any], model_cfg: ModelConfig, vocab_size: int, *,
                     optimizer: bool, distributed_optimizer: bool = False,
                     where: Path | str = "checkpoint") -> None:
    """ConfigError listing every field in which the checkpoint (its meta.json) and this run
    differ in a way the load cannot bridge. `optimizer`: the optimizer state will be loaded
    too (its dtype and kind must then match as well)."""
    lines = _model_mismatches(meta.get("model") or {}, model_cfg)
    saved_vocab = meta.get("vocab_size")
    if saved_vocab is not None and int(saved_vocab) != int(vocab_size):
        lines.append(f"vocab_size: checkpoint {saved_vocab}, this run {vocab_size} (--set "
                     f"model.vocab_size={saved_vocab}, or use the tokenizer the checkpoint was "
                     f"trained with: model.vocab_size=0 takes the tokenizer's size)")
    if optimizer:
        lines.extend(_optimizer_mismatches(meta, model_cfg, distributed_optimizer))
    if lines:
        raise ConfigError(f"checkpoint {where} does not match this run:\n  " + "\n  ".join(lines)
                          + f"\n{_FIX}")
