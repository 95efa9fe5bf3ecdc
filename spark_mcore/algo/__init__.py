"""Pure tensor functions of the GRPO objective: advantages, losses, log-probs from logits.

The names below are loaded on first use (PEP 562), so that `spark_mcore.algo.config` (read by
the run config) imports no torch: a config error must not cost a torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "grpo_advantages": "advantages", "zero_variance_groups": "advantages",
    "AlgoConfig": "config",
    "token_entropy": "logprobs", "token_logprobs": "logprobs", "vocab_parallel_entropy": "logprobs",
    "vocab_parallel_logprobs": "logprobs",
    "aggregate": "losses", "grpo_loss": "losses", "kl_penalty": "losses", "policy_loss": "losses",
    "sft_loss": "losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spark_mcore.algo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spark_mcore.algo.{_EXPORTS[name]}"), name)
