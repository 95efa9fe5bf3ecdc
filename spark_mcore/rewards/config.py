from __future__ import annotations

from dataclasses import dataclass, field

from spark_mcore.config.loader import ConfigError


@dataclass
class RewardConfig:
    """Verification of responses.

    timeout_s: per-response limit for one verifier call (math-verify/sympy can hang).
    num_workers: processes in the verifier pool; 0 verifies in this process (the limit is then
        enforced only when scoring from the main thread; see spark_mcore/rewards/timeout.py).
    kill_grace_s: seconds a pool worker gets past timeout_s to report its own (signal) timeout
        before the pool kills and replaces it; the worst case per item is timeout_s + kill_grace_s.
    verifier_modules: importable modules that register extra verifiers (`@register_verifier`);
        the pool imports them in this process and in every worker, e.g. ["my_pkg.verifiers"].
    """

    timeout_s: float = 5.0
    num_workers: int = 0
    kill_grace_s: float = 1.0
    verifier_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError("reward.timeout_s must be > 0")
        if self.num_workers < 0:
            raise ConfigError("reward.num_workers must be >= 0")
        if self.kill_grace_s <= 0:
            raise ConfigError("reward.kill_grace_s must be > 0 (e.g. 1.0)")
        for i, module in enumerate(self.verifier_modules):
            if not isinstance(module, str) or not module.strip():
                raise ConfigError(
                    f"reward.verifier_modules[{i}] must be a module name like 'my_pkg.verifiers', got {module!r}"
                )
