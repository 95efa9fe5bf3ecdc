"""Pure tensor functions of the GRPO objective: advantages, losses, log-probs from logits."""

# spark_mcore.config imports every component config (algo.config included) and algo.config
# imports spark_mcore.config.loader: importing the config package first keeps that cycle from
# failing when a caller's first import is `spark_mcore.algo.<module>`.
import spark_mcore.config  # noqa: F401  (import order matters, see above)
from spark_mcore.algo.advantages import grpo_advantages, zero_variance_groups
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.logprobs import (
    token_entropy,
    token_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from spark_mcore.algo.losses import aggregate, grpo_loss, kl_penalty, policy_loss, sft_loss

__all__ = [
    "AlgoConfig",
    "aggregate",
    "grpo_advantages",
    "grpo_loss",
    "kl_penalty",
    "policy_loss",
    "sft_loss",
    "token_entropy",
    "token_logprobs",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "zero_variance_groups",
]
