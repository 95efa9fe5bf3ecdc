"""Token-level advantages of a policy batch, once its old and reference log-probs exist.

GRPO's outcome advantages are known when the batch is built (`groups_to_batch`); SPRO's need
the log-probs of the sampling policy and the reference, so they are refined here, on the whole
batch (every member of a group present) before it is split into mini- and micro-batches.
"""

from __future__ import annotations

import torch

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.prefix import prefix_token_advantages
from spark_mcore.algo.process import TOKEN_ADVANTAGES
from spark_mcore.types import TrainBatch


def refine_advantages(batch: TrainBatch, algo: AlgoConfig) -> dict[str, float]:
    """Replaces `batch.advantages` [B] by the `algo.advantage` entry's result ([B] or [B, T]).

    Returns metrics, only for token-level advantages: `adv_process_abs` (mean |token advantage
    - outcome advantage| over the response tokens: the size of the process term).
    """
    if batch.old_logprobs is None:
        raise ValueError("refine_advantages needs batch.old_logprobs: compute them first")
    if algo.advantage != "grpo" and batch.ref_logprobs is None:
        raise ValueError(f"algo.advantage={algo.advantage} needs reference log-probs (batch.ref_logprobs)")
    if batch.group_ids is None:
        raise ValueError("refine_advantages needs batch.group_ids (set by groups_to_batch)")
    outcome = batch.advantages
    fn = TOKEN_ADVANTAGES[algo.advantage]
    batch.advantages = fn(outcome, batch.old_logprobs, batch.ref_logprobs, batch.loss_mask, batch.group_ids,
                          algo.spro_beta)
    if batch.advantages.dim() == 1:
        return {}
    mask = batch.loss_mask > 0
    dev = (batch.advantages - outcome.unsqueeze(1)).abs()
    total = torch.where(mask, dev, torch.zeros_like(dev)).sum()
    return {"adv_process_abs": float(total / mask.sum().clamp(min=1))}


def keep_prefix_advantages(batch: TrainBatch, entropy: torch.Tensor | None, keep_fraction: float) -> dict[str, float]:
    """Prefix-RFT: replaces `batch.advantages` ([B] or [B, T]) by [B, T] advantages in which only
    the highest-entropy `keep_fraction` of the batch's prefix tokens keep theirs (the others 0).
    Runs on the whole step batch (the fraction is of all its prefix tokens), after
    `refine_advantages`. `entropy` [B, T] is the trainer's (None: the batch has no prefix tokens).

    Returns metrics prefix_kept_frac, prefix_entropy (0.0 without prefix tokens).
    """
    if batch.prefix_mask is None:
        raise ValueError("keep_prefix_advantages needs batch.prefix_mask (rollout.prefix.enabled)")
    if entropy is None:
        if bool((batch.prefix_mask.bool() & (batch.loss_mask > 0)).any()):
            raise ValueError("keep_prefix_advantages: the batch has prefix tokens but no entropy was given")
        return {"prefix_kept_frac": 0.0, "prefix_entropy": 0.0}
    batch.advantages, metrics = prefix_token_advantages(batch.advantages, batch.loss_mask, batch.prefix_mask,
                                                        entropy, keep_fraction)
    return metrics
