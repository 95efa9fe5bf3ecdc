"""Supervised warm start: next-token likelihood on worked solutions, on the same Megatron actor."""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from spark_mcore.data.chat import encode_response
from spark_mcore.data.dataset import sft_examples
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import pack_sequences
from spark_mcore.trainer.config import WarmStartConfig
from spark_mcore.types import Prompt, TrainBatch


def sft_batches(prompts: list[Prompt], tokenizer: object, encode: object, batch_size: int,
                seed: int) -> "iter[TrainBatch]":
    """Endless shuffled batches of (prompt, worked solution) with the loss on the solution only."""
    pairs = sft_examples(prompts)
    rng = random.Random(seed)
    while True:
        rng.shuffle(pairs)
        for start in range(0, len(pairs) - batch_size + 1, batch_size):
            chunk = pairs[start:start + batch_size]
            tokens, mask = pack_sequences([encode(p) for p, _ in chunk],
                                          [encode_response(tokenizer, s) for _, s in chunk],
                                          pad_id=getattr(tokenizer, "pad_token_id", 0) or 0)
            yield TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.zeros(len(chunk)))


def warm_start(actor: MegatronActor, prompts: list[Prompt], tokenizer: object, encode: object,
               cfg: WarmStartConfig, seed: int, progress: bool = True) -> dict[str, float]:
    """Runs `cfg.steps` SFT steps; returns the last step's metrics."""
    actor.setup_optimizer(cfg.lr, cfg.steps, cfg.warmup_steps)
    batches = sft_batches(prompts, tokenizer, encode, cfg.batch_size, seed)
    metrics: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        metrics = actor.sft_step(next(batches))
        bar.set_postfix(loss=f"{metrics['sft_loss']:.3f}")
    return metrics
