from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spark_mcore.config.loader import ConfigError


@dataclass
class AlgoConfig:
    """GRPO objective.

    adv_eps: advantage = (r - mean) / (std + adv_eps) within each group.
    normalize_std: divide by the group std (False = Dr.GRPO-style mean-centering only).
    clip_eps / clip_eps_high: PPO ratio clip range [1 - clip_eps, 1 + clip_eps_high].
    kl_coef / kl_estimator: KL(policy || reference) loss term; kl_coef 0 disables the reference.
    loss_agg: "token_mean" over all response tokens of the batch, or "seq_mean" (mean per
        sequence, then over sequences).
    entropy_coef: subtracts entropy_coef * entropy from the loss.
    filter_zero_variance: drop groups whose rewards are all equal (they carry no signal).
    logprob_chunk_tokens: tokens per chunk when computing log-probs / entropy from logits
        (`spark_mcore.algo.logprobs`); None picks ~64 MiB of fp32 per chunk.
    advantage: "grpo" (one outcome advantage per response) or "spro" (SPRO, arXiv 2507.01551:
        the outcome advantage plus the Masked Step Advantage of the policy's own cumulative
        process reward spro_beta * sum_{j<=t} (log pi_old - log pi_ref), centred over the
        group's responses still active at token t; `spark_mcore.algo.process`). "spro" needs
        the reference model, which is then kept even with kl_coef 0. With
        filter_zero_variance, groups of equal outcome rewards are dropped under "spro" as well,
        although their MSA is not zero.
    spro_beta: SPRO's process-reward scale beta (not published with confidence; 0.05 is the
        implicit-PRM value PRIME used). 0 reduces "spro" to "grpo".
    tis_cap: truncated importance sampling for off-policy rollouts (async mode): each token's
        policy-gradient term is weighted by min(p_trainer_old / p_engine, tis_cap); 0 disables.
    """

    adv_eps: float = 1e-9
    normalize_std: bool = True
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_coef: float = 1e-3
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    entropy_coef: float = 0.0
    filter_zero_variance: bool = False
    logprob_chunk_tokens: int | None = None
    advantage: Literal["grpo", "spro"] = "grpo"
    spro_beta: float = 0.05
    tis_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.clip_eps <= 0:
            raise ConfigError("algo.clip_eps must be > 0")
        if self.kl_coef < 0:
            raise ConfigError("algo.kl_coef must be >= 0")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ConfigError("algo.clip_eps_high must be > 0, or null to reuse algo.clip_eps")
        if self.tis_cap < 0:
            raise ConfigError("algo.tis_cap must be >= 0 (0 disables truncated importance sampling; e.g. 2.0)")
        if self.adv_eps < 0:
            raise ConfigError("algo.adv_eps must be >= 0 (e.g. 1e-9)")
        if self.logprob_chunk_tokens is not None and self.logprob_chunk_tokens < 1:
            raise ConfigError("algo.logprob_chunk_tokens must be >= 1, or null for automatic")
        if self.spro_beta < 0:
            raise ConfigError(f"algo.spro_beta must be >= 0 (e.g. 0.05), got {self.spro_beta}")

    @property
    def needs_reference(self) -> bool:
        """The frozen reference is needed for the KL term and for SPRO's process reward."""
        return self.kl_coef > 0 or self.advantage == "spro"
