"""Vocab-parallel log-probs / entropy over 2 gloo processes equal the single-process result."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spark_mcore.algo.logprobs import (
    token_entropy,
    token_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)

WORLD = 2
VOCAB = 50
# Unequal slices on purpose: rank 0 holds [0, 27), rank 1 holds [27, 50).
SPLIT = (0, 27, VOCAB)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(3, 5, VOCAB, generator=g) * 2).to(dtype)
    labels = torch.randint(0, VOCAB, (3, 5), generator=g)
    labels[1, 3] = -100  # ignored position
    labels[0, 0], labels[0, 1] = SPLIT[1] - 1, SPLIT[1]  # both sides of the shard boundary
    return logits, labels, torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)


def _single(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, w_ent: torch.Tensor):
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, labels, chunk_size=4)
    ent = token_entropy(x, chunk_size=4)
    ((lp * w).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad.float()


def _check_parallel(rank: int, dtype: torch.dtype, tol: float) -> None:
    logits, labels, w, w_ent = _inputs(dtype)
    lo, hi = SPLIT[rank], SPLIT[rank + 1]
    shard = logits[..., lo:hi].clone().requires_grad_()
    lp = vocab_parallel_logprobs(shard, labels, lo, dist.group.WORLD, chunk_size=4)
    ent = vocab_parallel_entropy(shard, dist.group.WORLD, chunk_size=4)
    ((lp * w).sum() + (ent * w_ent).sum()).backward()
    ref_lp, ref_ent, ref_grad = _single(logits, labels, w, w_ent)
    assert (lp - ref_lp).abs().max().item() <= tol
    assert (ent - ref_ent).abs().max().item() <= tol
    assert shard.grad.dtype == dtype
    # A bf16 gradient may differ by one bf16 rounding step when the fp32 values straddle it.
    rtol = 0.0 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(shard.grad.float(), ref_grad[..., lo:hi], rtol=rtol, atol=tol)
    assert lp[1, 3].item() == 0.0


def _check_size_one_groups(rank: int) -> None:
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    logits, labels, w, w_ent = _inputs(torch.float32)
    x = logits.clone().requires_grad_()
    lp = vocab_parallel_logprobs(x, labels, 0, groups[rank], chunk_size=4)
    ent = vocab_parallel_entropy(x, groups[rank], chunk_size=4)
    ((lp * w).sum() + (ent * w_ent).sum()).backward()
    ref_lp, ref_ent, ref_grad = _single(logits, labels, w, w_ent)
    assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent) and torch.equal(x.grad, ref_grad)


def _check_bad_labels_fail_on_every_rank(rank: int) -> None:
    logits, labels, _, _ = _inputs(torch.float32)
    labels[2, 2] = VOCAB  # no shard holds it: both ranks must raise, none may hang
    lo, hi = SPLIT[rank], SPLIT[rank + 1]
    with pytest.raises(ValueError, match="labels must lie in"):
        vocab_parallel_logprobs(logits[..., lo:hi], labels, lo, dist.group.WORLD)


def _worker(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        _check_parallel(rank, torch.float32, 1e-5)
        _check_parallel(rank, torch.bfloat16, 1e-5)
        _check_size_one_groups(rank)
        _check_bad_labels_fail_on_every_rank(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_matches_single_process() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
