"""Supervised warm start: next-token likelihood on worked solutions, on the same Megatron actor,
optionally mixed with SPARK-format reward tasks (`warmstart.judge_fraction`)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch
from tqdm import tqdm

from spark_mcore.data.chat import encode_response
from spark_mcore.data.dataset import sft_examples
from spark_mcore.spark.warmstart_data import judge_sft_examples
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import pack_sequences
from spark_mcore.trainer.config import WarmStartConfig
from spark_mcore.types import Prompt, TrainBatch

Example = tuple[Prompt, str]


def judge_counts(steps: int, batch_size: int, fraction: float) -> list[int]:
    """Reward-task examples in each of `steps` batches: the running total after batch j is
    round((j + 1) * fraction * batch_size), so any run of batches holds the fraction to within
    one example (a batch of 4 at 0.25 gets exactly one)."""
    totals = [math.floor((j + 1) * fraction * batch_size + 0.5) for j in range(steps)]
    return [t - (totals[j - 1] if j else 0) for j, t in enumerate(totals)]


def _endless(examples: list[Example], rng: random.Random) -> Iterator[Example]:
    pool = list(examples)
    while True:
        rng.shuffle(pool)
        yield from pool


def sft_batches(prompts: list[Prompt], tokenizer: object, encode: object, batch_size: int,
                seed: int, judge_fraction: float = 0.0, steps: int = 0) -> Iterator[TrainBatch]:
    """Endless shuffled batches of (prompt, target) with the loss on the target only: worked
    solutions, and with `judge_fraction` > 0 that share of reward tasks (planned for `steps`
    batches; later batches keep the last batch's mix)."""
    rng = random.Random(seed)
    solutions = _endless(sft_examples(prompts), rng)
    counts = judge_counts(max(steps, 1), batch_size, judge_fraction) if judge_fraction > 0 else [0]
    judge = _endless(judge_sft_examples(prompts, max(sum(counts), 1), seed), rng) if sum(counts) else None
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    for j in range(10**12):
        k = counts[min(j, len(counts) - 1)]
        chunk = [next(solutions) for _ in range(batch_size - k)]
        chunk += [next(judge) for _ in range(k)] if judge is not None else []
        tokens, mask = pack_sequences([encode(p) for p, _ in chunk],
                                      [encode_response(tokenizer, s) for _, s in chunk], pad_id=pad)
        yield TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.zeros(len(chunk)),
                         kinds=[str(p.meta.get("spark_kind", "policy")) for p, _ in chunk])


def warm_start(actor: MegatronActor, prompts: list[Prompt], tokenizer: object, encode: object,
               cfg: WarmStartConfig, seed: int, progress: bool = True) -> dict[str, float]:
    """Runs `cfg.steps` SFT steps; returns the last step's metrics."""
    actor.setup_optimizer(cfg.lr, cfg.steps, cfg.warmup_steps)
    batches = sft_batches(prompts, tokenizer, encode, cfg.batch_size, seed, cfg.judge_fraction, cfg.steps)
    metrics: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        metrics = actor.sft_step(next(batches))
        bar.set_postfix(loss=f"{metrics['sft_loss']:.3f}")
    return metrics
