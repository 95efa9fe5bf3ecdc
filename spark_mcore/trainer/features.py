"""GPU-only trainer features checked together when a run config loads: FP8 and sequence
parallelism need Transformer Engine layers (context parallelism runs on either spec: TE's CP
attention, or the local spec's all-gather SDPA core); each refusal names the field and what to
install or set instead."""

from __future__ import annotations

from spark_mcore.config import accel
from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.config import TrainerConfig


def _te_missing(feature: str, model: ModelConfig) -> ConfigError:
    if model.transformer_impl == "local":
        return ConfigError(f"{feature} needs Transformer Engine layers, but model.transformer_impl=local; set "
                           "model.transformer_impl=transformer_engine (or auto)")
    where = "no CUDA device here; " if not accel.cuda_available() else ""
    reason = accel.probe("transformer_engine.pytorch")[1]
    return ConfigError(f"{feature} needs Transformer Engine, which does not import here ({where}{reason}); "
                       f"install {accel.INSTALL['transformer_engine']}")


def check_gpu_features(model: ModelConfig, trainer: TrainerConfig, parallel: ParallelConfig) -> None:
    """Raises ConfigError for a feature this machine or this config cannot run. Probes the
    machine (imports torch) only when one of these features is asked for."""
    if trainer.fp8 is None and not parallel.sequence_parallel and parallel.cp == 1:
        return
    te = model.use_te()
    if trainer.fp8 is not None:
        feature = f"trainer.fp8={trainer.fp8}"
        if not te:
            raise _te_missing(feature, model)
        if model.dtype == "fp32":
            raise ConfigError(f"{feature} trains fp8 GEMMs under a bf16 model; set model.dtype=bf16")
        if not accel.fp8_capable_gpu():
            raise ConfigError(f"{feature} needs a GPU of compute capability >= 8.9 (Ada/Hopper/Blackwell); "
                              "set trainer.fp8=null on this GPU")
    if parallel.sequence_parallel and not te:
        raise _te_missing("parallel.sequence_parallel=true", model)
    if parallel.cp > 1 and not te and model.attention == "megatron":
        raise ConfigError(f"parallel.cp={parallel.cp} with model.attention=megatron: megatron's local attention has "
                          "no context parallelism; set model.attention=sdpa (or auto), or use Transformer Engine")
    if parallel.cp > 1 and model.vision is not None:
        raise ConfigError(f"parallel.cp={parallel.cp} with a vision-language model: image rows are not split "
                          "per context-parallel rank yet; set parallel.cp=1")
