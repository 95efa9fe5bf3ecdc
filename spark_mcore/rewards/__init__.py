"""Verifiers (math via math-verify, exact, choice, judge, countdown) behind one registry, and a pool that
runs them with a per-item time limit. Importing this package registers the built-in verifiers."""

from spark_mcore.rewards import countdown as _countdown  # noqa: F401  (registers "countdown")
from spark_mcore.rewards import math_verifier as _math_verifier  # noqa: F401  (registers "math")
from spark_mcore.rewards import verifiers as _verifiers  # noqa: F401  (registers exact/choice/judge)
from spark_mcore.rewards.boxed import extract_boxed
from spark_mcore.rewards.config import RewardConfig
from spark_mcore.rewards.pool import VerifierPool
from spark_mcore.rewards.registry import Verifier, get_verifier, register_verifier, registered_verifiers

__all__ = [
    "RewardConfig",
    "Verifier",
    "VerifierPool",
    "extract_boxed",
    "get_verifier",
    "register_verifier",
    "registered_verifiers",
]
