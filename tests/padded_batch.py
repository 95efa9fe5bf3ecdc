"""A small right-padded TrainBatch shared by the actor unit tests: 6 rows of 10 tokens whose
response spans differ (3..10, 4..8, 2..5, 5..10, 3..9, 6..7), padding 0 after each span."""

from __future__ import annotations

import torch

from spark_mcore.types import TrainBatch

SPANS = [(3, 10), (4, 8), (2, 5), (5, 10), (3, 9), (6, 7)]


def padded_batch(vocab: int, advantages: torch.Tensor, **fields: torch.Tensor) -> TrainBatch:
    """Tokens drawn from [1, vocab) with seed 0, the loss mask over each row's span, and
    `advantages` [6]; `fields` sets further TrainBatch fields (step positions, outcomes...)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (len(SPANS), 10), generator=g)
    mask = torch.zeros(len(SPANS), 10)
    for i, (start, end) in enumerate(SPANS):
        mask[i, start:end] = 1
        tokens[i, end:] = 0
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=advantages, **fields)
