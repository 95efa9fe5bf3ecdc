from __future__ import annotations

from dataclasses import dataclass

from spark_mcore.config.loader import ConfigError


@dataclass
class ParallelConfig:
    """Model parallel layout; data parallel size = world_size / (tp * pp).

    backend: "auto" picks nccl with CUDA and gloo without.
    """

    tp: int = 1
    pp: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError("parallel.tp and parallel.pp must be >= 1")
