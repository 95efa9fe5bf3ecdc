from __future__ import annotations

from dataclasses import dataclass

from spark_mcore.config.loader import ConfigError


@dataclass
class RewardConfig:
    """Verification of responses.

    timeout_s: per-response limit for one verifier call (math-verify/sympy can hang).
    num_workers: processes in the verifier pool; 0 verifies in this process.
    """

    timeout_s: float = 5.0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError("reward.timeout_s must be > 0")
        if self.num_workers < 0:
            raise ConfigError("reward.num_workers must be >= 0")
