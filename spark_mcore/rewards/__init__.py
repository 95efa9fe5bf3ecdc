"""Verifiers (math via math-verify, exact, choice, judge, countdown) behind one registry, and a pool that
runs them with a per-item time limit. The registry loads the built-in verifiers on first use.

The names below are loaded on first use (PEP 562): `spark_mcore.rewards.config` (read by the
run config) must not pull in sympy and math-verify.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "extract_boxed": "boxed", "RewardConfig": "config", "VerifierPool": "pool", "Verifier": "registry",
    "get_verifier": "registry", "register_verifier": "registry", "registered_verifiers": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spark_mcore.rewards' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spark_mcore.rewards.{_EXPORTS[name]}"), name)
