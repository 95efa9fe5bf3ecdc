"""From model output logits to per-position log-probs aligned with the token tensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spark_mcore.algo.logprobs import token_logprobs, vocab_parallel_entropy, vocab_parallel_logprobs
from spark_mcore.distributed.context_parallel import gather_from_cp, split_for_cp
from spark_mcore.distributed.parallel import ParallelState


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, pstate: ParallelState, temperature: float = 1.0,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """logits [B, S, V/tp] (vocab-parallel shard), labels [B, S] -> log p(labels[:, s]) [B, S]
    under softmax(logits[:, s] / temperature), chunked fp32."""
    if pstate.tp_size > 1:
        vocab_start = pstate.tp_rank * logits.shape[-1]
        return vocab_parallel_logprobs(logits, labels, vocab_start, pstate.tp_group,
                                       chunk_size=chunk_tokens, temperature=temperature)
    return token_logprobs(logits, labels, chunk_size=chunk_tokens, temperature=temperature)


def sequence_logprobs(logits: torch.Tensor, tokens: torch.Tensor, pstate: ParallelState,
                      temperature: float = 1.0, chunk_tokens: int | None = None) -> torch.Tensor:
    """logits [B, T', V/tp] (vocab-parallel shard), tokens [B, T] -> logp [B, T].

    logp[:, t] = log p(tokens[:, t] | tokens[:, <t]) for t >= 1; logp[:, 0] = 0 (nothing predicts
    the first token). Log-probs are chunked fp32 (no full fp32 copy of the logits). They are of
    softmax(logits / temperature): the distribution the rollout engine sampled from.
    `chunk_tokens` (algo.logprob_chunk_tokens): rows per fp32 chunk; None = automatic.

    T' >= T: the model input may be right-padded (sequence / context parallelism need lengths in
    multiples of their sizes). With context parallelism (`pstate.cp_size` > 1) the logits are
    this CP rank's load-balanced split of the padded length (T' = padded T / C); the result is
    the full [B, T] on every CP rank, gathered with an "owned" backward (the loss after it is
    the same on every CP rank; see `spark_mcore.distributed.context_parallel`).
    """
    t = tokens.shape[1]
    if pstate.cp_size == 1:
        shifted = label_logprobs(logits[:, :t - 1], tokens[:, 1:], pstate, temperature, chunk_tokens)
        return F.pad(shifted, (1, 0))
    padded = logits.shape[1] * pstate.cp_size
    labels = F.pad(tokens[:, 1:], (0, padded - t + 1))  # labels[:, s] = tokens[:, s + 1]
    local = label_logprobs(logits, split_for_cp(labels, pstate.cp_size, pstate.cp_rank), pstate,
                           temperature, chunk_tokens)
    full = gather_from_cp(local, pstate.cp_group, dim=1, backward="owned")
    return F.pad(full[:, :t - 1], (1, 0))


@torch.no_grad()
def sequence_entropy(logits: torch.Tensor, length: int, pstate: ParallelState, temperature: float = 1.0,
                     chunk_tokens: int | None = None) -> torch.Tensor:
    """[B, length] entropy of the distribution that predicted each token (0 at t = 0), no grad;
    logits as in `sequence_logprobs` (padded, CP-split when `pstate.cp_size` > 1)."""
    tp_group = pstate.tp_group if pstate.tp_size > 1 else None
    if pstate.cp_size == 1:
        logits = logits[:, :length - 1]
    ent = vocab_parallel_entropy(logits.detach(), tp_group, chunk_tokens, temperature=temperature)
    if pstate.cp_size > 1:
        ent = gather_from_cp(ent, pstate.cp_group, dim=1)
    return F.pad(ent[:, :length - 1], (1, 0))
