"""Token-level advantages of a policy batch, once its old and reference log-probs exist.

GRPO's outcome advantages are known when the batch is built (`groups_to_batch`); SPRO's need
the log-probs of the sampling policy and the reference, so they are refined here, on the whole
batch (every member of a group present) before it is split into mini- and micro-batches.
"""

from __future__ import annotations

import torch

from spark_mcore.algo.config import AlgoConfig
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
