"""From model output logits to per-position log-probs aligned with the token tensor."""

from __future__ import annotations

import torch

from spark_mcore.algo.logprobs import token_logprobs, vocab_parallel_logprobs
from spark_mcore.distributed.parallel import ParallelState


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, pstate: ParallelState,
                      temperature: float = 1.0, chunk_tokens: int | None = None) -> torch.Tensor:
    """logits [B, T, V/tp] (vocab-parallel shard), tokens [B, T] -> logp [B, T].

    logp[:, t] = log p(tokens[:, t] | tokens[:, <t]) for t >= 1; logp[:, 0] = 0 (nothing predicts
    the first token). Log-probs are chunked fp32 (no full fp32 copy of the logits). They are of
    softmax(logits / temperature): the distribution the rollout engine sampled from.
    `chunk_tokens` (algo.logprob_chunk_tokens): rows per fp32 chunk; None = automatic.
    """
    labels = tokens[:, 1:]
    if pstate.tp_size > 1:
        vocab_start = pstate.tp_rank * logits.shape[-1]
        shifted = vocab_parallel_logprobs(logits[:, :-1], labels, vocab_start, pstate.tp_group,
                                          chunk_size=chunk_tokens, temperature=temperature)
    else:
        shifted = token_logprobs(logits[:, :-1], labels, chunk_size=chunk_tokens, temperature=temperature)
    return torch.nn.functional.pad(shifted, (1, 0))
