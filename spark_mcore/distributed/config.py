from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from spark_mcore.config.loader import ConfigError


@dataclass
class ParallelConfig:
    """Megatron parallel layout; data parallel size = world_size / (tp * pp * cp).

    tp / pp / cp: tensor, pipeline and context parallel sizes.
    virtual_pipeline_size: model chunks per pipeline rank (megatron's interleaved 1F1B
        schedule, which shrinks the pipeline bubble by this factor at the cost of more p2p
        traffic); None = one chunk per rank. Needs pp >= 2 and model.num_layers divisible by
        pp * virtual_pipeline_size. Micro-batch counts are padded to a multiple of pp.
    sequence_parallel: shard activations along the sequence inside TP regions (needs tp > 1
        and Transformer Engine or apex layer norms: GPU only).
    use_distributed_optimizer: shard optimizer state (fp32 main params, Adam moments) over DP
        with megatron's DistributedOptimizer: grads are reduce-scattered, params all-gathered
        after the step. Runs on CPU / gloo through cpu_shims (shim 8), where gloo's
        reduce-scatter is an all-reduce plus a slice: correct, not bandwidth-saving.
    recompute_granularity / recompute_method / recompute_num_layers: activation recompute,
        passed to megatron's TransformerConfig unchanged ("selective" recomputes attention).
    backend: "auto" picks nccl with CUDA and gloo without.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    virtual_pipeline_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.cp < 1:
            raise ConfigError("parallel.tp, parallel.pp and parallel.cp must be >= 1")
        if self.virtual_pipeline_size is not None and (self.virtual_pipeline_size < 2 or self.pp < 2):
            raise ConfigError(
                f"parallel.virtual_pipeline_size={self.virtual_pipeline_size} needs parallel.pp >= 2 "
                f"(got {self.pp}) and a value >= 2; set it to null for one model chunk per pipeline rank")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ConfigError("parallel.recompute_granularity=full needs parallel.recompute_method "
                              "(uniform or block) and parallel.recompute_num_layers")

    def check_device(self) -> None:
        """Fails early, naming the field, for features that cannot run without CUDA."""
        import torch  # here, not at module level: loading a config imports no torch

        if torch.cuda.is_available():
            return
        if self.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel=true needs CUDA (Transformer Engine or apex "
                              "layer norms); set it to false on CPU")

    def transformer_overrides(self) -> dict[str, Any]:
        """Fields of megatron's TransformerConfig this layout sets."""
        out: dict[str, Any] = {"sequence_parallel": self.sequence_parallel, "context_parallel_size": self.cp}
        if self.recompute_granularity is not None:
            out.update(recompute_granularity=self.recompute_granularity, recompute_method=self.recompute_method,
                       recompute_num_layers=self.recompute_num_layers)
        return out
