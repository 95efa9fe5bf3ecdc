from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from spark_mcore.config import accel
from spark_mcore.config.loader import ConfigError, check_ranges


@dataclass
class VisionConfig:
    """Vision tower and multimodal tokens of a vision-language family (qwen2_5_vl).

    Fields mirror the HF `vision_config` of Qwen2.5-VL (window attention, 2-D rotary, patch
    merger to the language model's hidden size). patch_size / window_size are in pixels;
    fullatt_block_indexes: blocks with full (not windowed) attention.
    mrope_section: rotary frequency pairs given to (temporal, height, width); sums to
        head_dim / 2 (the text config's `rope_parameters.mrope_section`).
    """

    depth: int = 2
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 2
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    tokens_per_second: int = 4
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1])
    hidden_act: str = "silu"
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self) -> None:
        if len(self.mrope_section) != 3:
            raise ConfigError(f"model.vision.mrope_section={self.mrope_section} must have 3 entries "
                              "(temporal, height, width)")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.vision.hidden_size must be divisible by model.vision.num_heads")


@dataclass
class StepHeadConfig:
    """MetaStone-S1's SPRM step-scoring head (arXiv 2507.01951), turned on by model.step_head.

    A head Linear(C -> 2C) - ReLU - Dropout - Linear(2C -> 1) on the second-to-last layer's
    hidden state at the token before each step delimiter of a policy response, trained with
    the response's verified outcome as every step's label (BCE-with-logits, only steps whose
    current prediction agrees with the label, class weights from the global step counts). It
    lives on the last pipeline stage, replicated over TP; its gradients are averaged over DP.
    It trains on the policy rows of each GRPO batch, so with algo.filter_zero_variance=true it
    never sees all-correct or all-wrong groups (they are dropped before the batch is built).

    delimiter: the text that ends a reasoning step. The default ". " fits the built-in arith
        and countdown worked solutions ("3+4=7. 7*2=14. \\boxed{14}"); the paper's
        ".\\n\\n" fits free-form reasoning (set step_head.delimiter=".\\n\\n" there). Found in
        the decoded response text, so it does not depend on how the tokenizer splits it.
    score_last: also score the response's last token when it does not end in the delimiter (the
        final step, e.g. the boxed answer).
    lr / weight_decay / grad_clip: the head's own AdamW (paper: 1e-5, 1e-2, 1.0); constant lr.
    dropout: between the two linears (paper: 0.5).
    backbone_grad_scale: the head's gradient into the backbone is multiplied by this (paper:
        1e-4); 0 detaches the head from the backbone.
    positive_factor: class weight of a positive step = positive_factor * N_neg / N (paper 1.5);
        a negative step weighs N_pos / N.
    """

    delimiter: str = ". "
    score_last: bool = True
    lr: float = 1e-5
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    dropout: float = 0.5
    backbone_grad_scale: float = 1e-4
    positive_factor: float = 1.5

    def __post_init__(self) -> None:
        check_ranges("step_head", self, {"lr": "> 0", "weight_decay": ">= 0", "grad_clip": ">= 0",
                                         "dropout": "in [0, 1)", "backbone_grad_scale": ">= 0",
                                         "positive_factor": "> 0"})
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ConfigError(f"step_head.delimiter={self.delimiter!r} must be a non-empty string (the text "
                              "that ends a reasoning step), e.g. step_head.delimiter='. '")


@dataclass
class ModelConfig:
    """Policy architecture (Qwen2 family: RMSNorm, SwiGLU, RoPE, GQA, QKV bias).

    family: adapter name in the model registry ("qwen2").
    hf_path: initialise from a Hugging Face checkpoint directory: its config.json sets the
        architecture (family must match; sizes, RoPE, tying, vision tower), its tokenizer is
        the default data.tokenizer; dtype, transformer_impl and attention stay as set here.
        None builds a random model of the sizes below.
    vocab_size: 0 takes the tokenizer's size.
    num_query_groups: key/value heads (GQA); must divide num_attention_heads.
    dtype: parameter dtype of the trainer ("fp32" on CPU; "bf16" on GPU).
    transformer_impl: megatron layer spec. "transformer_engine" = TE's fused layers (needed for
        FP8 and sequence parallel; context parallel runs on both specs); "local" = megatron's torch layers (CPU,
        and the HF parity reference); "auto" = Transformer Engine when it imports on CUDA, else
        local. Both specs map to the same HF weight names.
    attention: core attention of the local spec. "sdpa" = torch's scaled_dot_product_attention
        (flash / memory-efficient kernels on CUDA, no [b, h, s, s] scores); "megatron" =
        megatron's DotProductAttention (baddbmm + softmax); "auto" = sdpa on CUDA or with
        parallel.cp > 1 (the sdpa core implements context parallelism), megatron otherwise. Ignored with Transformer Engine, which has its own fused attention.
    vision: the vision tower of a vision-language family (family "qwen2_5_vl"); None for text.
    freeze_vision: keep the vision tower's weights fixed (no gradients, not synced as trained).
    step_head: train MetaStone-S1's SPRM step-scoring head beside the policy (settings in the
        run's `step_head` section, `StepHeadConfig`); its weights are checkpointed and exported
        as step_head.safetensors beside the HF weights, for `spark-mcore eval --best-of N
        --select step-head`. Needs model.num_layers >= 2 (it reads the second-to-last layer).
    """

    family: str = "qwen2"
    hf_path: str | None = None
    vocab_size: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 384
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = True
    init_std: float = 0.02
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    attention: Literal["auto", "sdpa", "megatron"] = "auto"
    vision: VisionConfig | None = None
    freeze_vision: bool = False
    step_head: bool = False

    def __post_init__(self) -> None:
        check_ranges("model", self, {
            "vocab_size": ">= 0", "hidden_size": ">= 1", "num_layers": ">= 1", "num_attention_heads": ">= 1",
            "num_query_groups": ">= 1", "ffn_hidden_size": ">= 1", "max_position_embeddings": ">= 1",
            "rope_theta": "> 0", "rms_norm_eps": "> 0", "init_std": "> 0"})
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.step_head and self.num_layers < 2:
            raise ConfigError(f"model.step_head=true reads the second-to-last layer, but model.num_layers="
                              f"{self.num_layers}. Fix: model.num_layers >= 2, or model.step_head=false")
        if self.vision is not None:
            half_head = self.hidden_size // self.num_attention_heads // 2
            if sum(self.vision.mrope_section) != half_head:
                raise ConfigError(
                    f"model.vision.mrope_section={self.vision.mrope_section} must sum to head_dim/2 "
                    f"= {half_head} (hidden_size / num_attention_heads / 2)")
        if self.transformer_impl == "transformer_engine" and not accel.te_available():
            raise ConfigError("model.transformer_impl=transformer_engine but Transformer Engine does not import "
                              f"here ({accel.probe('transformer_engine.pytorch')[1]}); install "
                              f"{accel.INSTALL['transformer_engine']}, or set model.transformer_impl=local")

    def use_te(self) -> bool:
        """Whether models are built with Transformer Engine's layer spec ("auto" resolved here)."""
        if self.transformer_impl == "auto":
            return accel.cuda_available() and accel.te_available()
        return self.transformer_impl == "transformer_engine"
