"""Registry of weight-sync implementations (the `WeightSync` hook of SGLangEngine), by mode.

    engine = SGLangEngine(sglang_cfg, weight_sync=build_weight_sync(WeightSyncConfig(mode="distributed")))

Built in: "distributed" (BucketWeightSync: NCCL/gloo broadcast per bucket) and "colocated"
(ColocatedWeightSync: CUDA IPC through /update_weights_from_tensor). A new transport registers
a factory `WeightSyncConfig -> WeightSync` under its own mode name.
"""

from __future__ import annotations

from collections.abc import Callable

from spark_mcore.config.loader import ConfigError
from spark_mcore.rollout.sglang import WeightSync
from spark_mcore.weights.config import WeightSyncConfig

WeightSyncFactory = Callable[[WeightSyncConfig], WeightSync]
_SYNCS: dict[str, WeightSyncFactory] = {}


def register_weight_sync(mode: str) -> Callable[[WeightSyncFactory], WeightSyncFactory]:
    def deco(factory: WeightSyncFactory) -> WeightSyncFactory:
        if mode in _SYNCS:
            raise ValueError(f"weight sync mode '{mode}' is registered twice")
        _SYNCS[mode] = factory
        return factory

    return deco


@register_weight_sync("distributed")
def _distributed(config: WeightSyncConfig) -> WeightSync:
    from spark_mcore.weights.sync import BucketWeightSync

    return BucketWeightSync(config)


@register_weight_sync("colocated")
def _colocated(config: WeightSyncConfig) -> WeightSync:
    from spark_mcore.weights.colocated import ColocatedWeightSync

    return ColocatedWeightSync(config)


def build_weight_sync(config: WeightSyncConfig) -> WeightSync:
    if config.mode not in _SYNCS:
        raise ConfigError(f"weights.mode '{config.mode}' is unknown; registered: {sorted(_SYNCS)}")
    return _SYNCS[config.mode](config)


def registered_weight_syncs() -> list[str]:
    return sorted(_SYNCS)


__all__ = ["register_weight_sync", "build_weight_sync", "registered_weight_syncs", "WeightSyncFactory"]
