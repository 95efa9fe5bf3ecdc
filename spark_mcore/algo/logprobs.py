"""Token log-probs and entropies from logits with bounded memory, also for vocab-parallel logits.

Why: at T = 4096 tokens and V = 151936 the naive `log_softmax(logits.float())` materialises two
fp32 [T, V] tensors (~5 GB) and keeps one for backward. Here the token dimension is processed in
chunks of `chunk_size` rows: at most one or two fp32 [chunk, V] buffers live at a time, and
backward recomputes the softmax chunk by chunk from the saved input logits (no copy of them is
saved) and a per-token log-normaliser [N].

Vocab parallelism: with Megatron's ColumnParallelLinear(gather_output=False) each rank of the
tensor-parallel `group` holds the contiguous vocab slice [vocab_start, vocab_start + V_local).
Per token, the forward combines local (max, sum-exp) pairs with one MAX and one SUM all-reduce of
[N]-sized vectors (not per chunk); backward needs no communication because the gradient of a
shard only depends on its own logits and the global log-normaliser.

All results are float32. `temperature` divides the logits inside the chunks (no scaled copy of
the logits is made); gradients include the 1 / temperature factor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "token_entropy",
    "token_logprobs",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
]

# Auto chunk size: one fp32 [chunk, V] buffer of about this many bytes (~110 rows at V=151936).
DEFAULT_CHUNK_BYTES = 64 * 2**20

_Block = tuple[slice, Tensor]


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}; or pass None (auto)")
    return chunk_size


def _row_blocks(logits: Tensor, chunk: int) -> list[_Block]:
    """(flat token slice, [n, V] view) pairs covering logits [B, T, V] row by row, in order.

    Works for any strides (e.g. a transposed [S, B, V] Megatron output) without copying.
    """
    b, t, v = logits.shape
    try:
        flat = logits.view(b * t, v)
        return [(slice(s, min(s + chunk, b * t)), flat[s : s + chunk]) for s in range(0, b * t, chunk)]
    except RuntimeError:
        return [
            (slice(i * t + s, i * t + min(s + chunk, t)), logits[i, s : s + chunk])
            for i in range(b)
            for s in range(0, t, chunk)
        ]


def _scaled_fp32(x: Tensor, temperature: float) -> Tensor:
    """A fresh fp32 copy of the chunk divided by temperature (safe to modify in place)."""
    z = x.to(torch.float32, copy=True)
    return z.div_(temperature) if temperature != 1.0 else z


def _log_softmax_chunk(x: Tensor, temperature: float, big_m: Tensor, log_s: Tensor) -> Tensor:
    """log softmax of a [n, V_local] chunk given the global max M [n] and log-sum-exp log S [n]."""
    return _scaled_fp32(x, temperature).sub_(big_m.unsqueeze(-1)).sub_(log_s.unsqueeze(-1))


def _check_logits(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float [B, T, V] tensor, got {logits.dtype} {tuple(logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _block_stats(x: Tensor, temperature: float, with_moment: bool) -> tuple[Tensor, ...]:
    """(max m, sum exp(z - m), [sum exp(z - m)(z - m)]) per row of one [n, V_local] chunk.

    A separate function so that the fp32 chunk buffers are freed on return, before the next
    chunk is allocated (a loop-local name would keep two chunks alive at once).
    """
    z = _scaled_fp32(x, temperature)
    m = z.amax(dim=-1)
    z.sub_(torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
    if not with_moment:
        return m, z.exp_().sum(dim=-1)
    # Clamp so that exp(-inf) * (-inf) cannot produce NaN for masked vocab entries.
    z.clamp_(min=torch.finfo(torch.float32).min)
    e = torch.exp(z)
    s = e.sum(dim=-1)
    return m, s, e.mul_(z).sum(dim=-1)  # in place: no third [n, V] buffer


def _local_stats(
    logits: Tensor, chunk: int, temperature: float, with_moment: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token local max m [N], s = sum exp(z - m) [N], and (optionally) the first moment
    t = sum exp(z - m) * (z - m) [N] over this shard's vocab, where z = logits / temperature.

    A row whose logits are all -inf gets m = -inf, s = 0, t = 0.
    """
    n = logits.shape[0] * logits.shape[1]
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m) if with_moment else None
    for rows, x in _row_blocks(logits, chunk):
        stats = _block_stats(x, temperature, with_moment)
        m[rows], s[rows] = stats[0], stats[1]
        if t is not None:
            t[rows] = stats[2]
    return m, s, t


def _combine(
    m: Tensor, s: Tensor, t: Tensor | None, extra: list[Tensor], group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """Global (max M, sum exp(z - M) S, sum exp(z - M)(z - M) W) from the shards' local stats.

    `extra` vectors [N] are summed over the group in the same all-reduce. Returns (M, S, W, extra).
    """
    if _world(group) == 1:
        return m, s, t, extra
    big_m = m.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    # Rows with s == 0 (all -inf locally) contribute nothing; avoid exp overflow there.
    scale = torch.where(s > 0, torch.exp(m_safe - big_m), 0.0)
    parts = [s * scale]
    if t is not None:
        parts.append((t + (m_safe - big_m) * s) * scale)
    stacked = torch.stack(parts + extra)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    big_w = stacked[1] if t is not None else None
    return big_m, stacked[0], big_w, list(stacked[len(parts) :])


def _target_logits(
    logits: Tensor, local_labels: Tensor, in_shard: Tensor, chunk: int, temperature: float
) -> Tensor:
    """z[label] per token [N] (0 where the label is outside this shard)."""
    out = torch.zeros(local_labels.shape, dtype=torch.float32, device=logits.device)
    idx = torch.where(in_shard, local_labels, 0)
    for rows, x in _row_blocks(logits, chunk):
        out[rows] = x.gather(-1, idx[rows].unsqueeze(-1)).squeeze(-1).float()
    out = out / temperature if temperature != 1.0 else out
    return torch.where(in_shard, out, 0.0)


def _logprob_grad_block(
    x: Tensor, temperature: float, big_m: Tensor, log_s: Tensor, g: Tensor, idx: Tensor, g_hit: Tensor
) -> Tensor:
    """g * (onehot(label) - softmax(z)) / temperature for one [n, V_local] chunk (fp32)."""
    p = _log_softmax_chunk(x, temperature, big_m, log_s).exp_()
    p.mul_(-g.unsqueeze(-1)).scatter_add_(-1, idx, g_hit)
    return p.div_(temperature) if temperature != 1.0 else p


def _entropy_grad_block(
    x: Tensor, temperature: float, big_m: Tensor, log_s: Tensor, ent: Tensor, coef: Tensor
) -> Tensor:
    """coef * p * (log p + H) for one chunk, coef = -g / temperature (d H / d z_j = -p_j (log p_j + H)).

    log p is clamped so that entries with p = 0 (logit -inf) give 0 instead of 0 * -inf.
    """
    log_p = _log_softmax_chunk(x, temperature, big_m, log_s).clamp_(min=torch.finfo(torch.float32).min)
    p = torch.exp(log_p)
    return p.mul_(log_p.add_(ent.unsqueeze(-1))).mul_(coef.unsqueeze(-1))


class _LogprobFn(torch.autograd.Function):
    """logp[n] = z[n, label[n]] - logsumexp(z[n, :]) with z = logits / temperature."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        labels: Tensor,
        vocab_start: int,
        group: dist.ProcessGroup | None,
        chunk: int,
        temperature: float,
        ignore_index: int,
    ) -> Tensor:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        local = flat - vocab_start
        in_shard = valid & (local >= 0) & (local < logits.shape[-1])
        m, s, _ = _local_stats(logits, chunk, temperature, with_moment=False)
        target = _target_logits(logits, local, in_shard, chunk, temperature)
        big_m, big_s, _, (target, hits) = _combine(m, s, None, [target, in_shard.float()], group)
        # Every non-ignored label must fall in exactly one shard (all ranks see the same hits).
        if bool((valid & (hits != 1)).any()):
            raise ValueError(
                "labels must lie in [0, vocab size) or equal ignore_index; with vocab parallelism "
                "vocab_start must make the ranks' slices tile the vocabulary exactly once"
            )
        # (z - M) - log S, in log_softmax's order: more accurate than z - (M + log S).
        log_s = torch.log(big_s)
        ctx.save_for_backward(logits, local, in_shard, valid, big_m, log_s)
        ctx.chunk, ctx.temperature = chunk, temperature  # type: ignore[attr-defined]
        return torch.where(valid, (target - big_m) - log_s, 0.0).view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple:  # type: ignore[override]
        logits, local, in_shard, valid, big_m, log_s = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk, temperature = ctx.chunk, ctx.temperature  # type: ignore[attr-defined]
        g = torch.where(valid, grad_out.reshape(-1).float(), 0.0)
        idx = torch.where(in_shard, local, 0).unsqueeze(-1)
        g_hit = torch.where(in_shard, g, 0.0).unsqueeze(-1)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad.view(-1, logits.shape[-1])
        for rows, x in _row_blocks(logits, chunk):
            flat_grad[rows].copy_(
                _logprob_grad_block(x, temperature, big_m[rows], log_s[rows], g[rows], idx[rows], g_hit[rows])
            )
        return grad, None, None, None, None, None, None


class _EntropyFn(torch.autograd.Function):
    """H[n] = -sum_v p log p with p = softmax(logits / temperature)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        group: dist.ProcessGroup | None,
        chunk: int,
        temperature: float,
    ) -> Tensor:
        m, s, t = _local_stats(logits, chunk, temperature, with_moment=True)
        big_m, big_s, big_w, _ = _combine(m, s, t, [], group)
        log_s = torch.log(big_s)
        ent = log_s - big_w / big_s  # type: ignore[operator]
        ctx.save_for_backward(logits, big_m, log_s, ent)
        ctx.chunk, ctx.temperature = chunk, temperature  # type: ignore[attr-defined]
        return ent.view(logits.shape[:2])

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple:  # type: ignore[override]
        logits, big_m, log_s, ent = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk, temperature = ctx.chunk, ctx.temperature  # type: ignore[attr-defined]
        coef = grad_out.reshape(-1).float() / -temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad = grad.view(-1, logits.shape[-1])
        for rows, x in _row_blocks(logits, chunk):
            flat_grad[rows].copy_(
                _entropy_grad_block(x, temperature, big_m[rows], log_s[rows], ent[rows], coef[rows])
            )
        return grad, None, None, None


def _check_labels(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int) -> None:
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be [B, T] = {tuple(logits.shape[:2])} matching logits, got "
            f"{tuple(labels.shape)}; logits[:, t] scores labels[:, t] (shift before calling)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}; call .long()")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}; move them")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if ignore_index >= 0:
        raise ValueError(f"ignore_index must be < 0 so it cannot be a token id, got {ignore_index}")


def vocab_parallel_logprobs(
    logits_shard: Tensor,
    labels: Tensor,
    vocab_start: int,
    group: dist.ProcessGroup | None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Log-probs of `labels` when the vocab dimension is split over the ranks of `group`.

    Args:
        logits_shard: [B, T, V_local] any float dtype (bf16 ok); this rank's vocab columns
            [vocab_start, vocab_start + V_local). Differentiable; its gradient is this shard's.
        labels: [B, T] global token ids, identical on all ranks; logits[:, t] scores labels[:, t].
        vocab_start: first global vocab id of the shard.
        group: tensor-parallel group; None (or size 1) means the shard is the whole vocab.
        chunk_size: tokens per chunk (None: about DEFAULT_CHUNK_BYTES of fp32 per chunk).
        temperature: logits are divided by it.
        ignore_index: labels equal to it get log-prob 0 and no gradient.
    Returns:
        [B, T] float32 log-probs. Collective: every rank of `group` must call it.
    """
    _check_logits(logits_shard, temperature)
    _check_labels(logits_shard, labels, vocab_start, ignore_index)
    chunk = _chunk_rows(logits_shard.shape[-1], chunk_size)
    return _LogprobFn.apply(
        logits_shard, labels, vocab_start, group, chunk, temperature, ignore_index
    )


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """log_softmax(logits / temperature)[b, t, labels[b, t]] without a full fp32 copy.

    Args:
        logits: [B, T, V] float (bf16 ok; math is fp32), possibly non-contiguous.
        labels: [B, T] integer; no shifting is done here.
        chunk_size, temperature, ignore_index: see `vocab_parallel_logprobs`.
    Returns:
        [B, T] float32, differentiable w.r.t. logits (backward recomputes per chunk).
    """
    return vocab_parallel_logprobs(logits, labels, 0, None, chunk_size, temperature, ignore_index)


def vocab_parallel_entropy(
    logits_shard: Tensor,
    group: dist.ProcessGroup | None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Entropy of softmax(logits / temperature) over the full vocab split across `group`.

    Args:
        logits_shard: [B, T, V_local] this rank's vocab slice (any float dtype).
        group: tensor-parallel group, or None for the whole vocab on this rank.
        chunk_size, temperature: see `vocab_parallel_logprobs`.
    Returns:
        [B, T] float32 entropies (nats). Differentiable, although the usual use (a metric with
        entropy_coef = 0) needs no gradient: call it under torch.no_grad() to record no graph.
    """
    _check_logits(logits_shard, temperature)
    chunk = _chunk_rows(logits_shard.shape[-1], chunk_size)
    return _EntropyFn.apply(logits_shard, group, chunk, temperature)


def token_entropy(
    logits: Tensor, chunk_size: int | None = None, temperature: float = 1.0
) -> Tensor:
    """Per-token entropy [B, T] (float32) of softmax(logits [B, T, V] / temperature), chunked.

    Usually a metric: call under torch.no_grad(). It is differentiable (chunked recompute in
    backward, like `token_logprobs`) for losses with algo.entropy_coef != 0.
    """
    return vocab_parallel_entropy(logits, None, chunk_size, temperature)
