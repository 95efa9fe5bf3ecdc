"""Token positions and time of padded vs packed (`trainer.pack_sequences`) micro-batches on a
GRPO batch shaped like the built-in arith task.

    python tools/bench_packing.py                       # 32 prompts x 8, tiny model, 3 repeats
    python tools/bench_packing.py --quick               # 8 prompts x 8, 1 repeat
    python tools/bench_packing.py --budgets 0 256 1024  # trainer.max_tokens_per_micro_batch values
    python tools/bench_packing.py --repeats 0           # token counts only (no model compute)

Prompts are real arith prompts (levels 1-2) rendered with the built-in tokenizer's chat
template; response lengths are drawn uniformly from --response-min..--response-max tokens
(the tiny demo's responses run 10-48 tokens). For each token budget the actor's own
micro-batch plan is measured: token positions the model computes (rows x row length, over all
micro-batches) against the tokens that matter (each sequence up to its last response token),
and the wall time of compute_logprobs (forward) and train_step (forward + backward + Adam),
median over repeats (padded and packed alternate), on this machine's CPU at world size 1. On CPU the packed path uses an
explicit [R, 1, L, L] mask, so attention stays quadratic in the row length L: long rows
(large budgets) trade padding for attention work there; the THD path of Transformer Engine
(GPU) does not. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.data.arith import arith_problems
from spark_mcore.data.chat import encode_prompt
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import pack_sequences
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.trainer.packing import packing_stats
from spark_mcore.types import TrainBatch


def arith_batch(prompts: int, group: int, rmin: int, rmax: int, seed: int) -> tuple[TrainBatch, int]:
    """A right-padded GRPO batch of `prompts` x `group` sequences, and the vocabulary size."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(tmp)
    rng = random.Random(seed)
    ids = [encode_prompt(tok, p) for p in arith_problems([1, 2], "train", prompts, seed)]
    vocab = len(tok)
    prompt_ids = [p for p in ids for _ in range(group)]
    responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(rmin, rmax))] for _ in prompt_ids]
    tokens, mask = pack_sequences(prompt_ids, responses, pad_id=int(tok.pad_token_id))
    adv = torch.tensor([rng.choice([-1.0, 1.0]) for _ in prompt_ids])
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=adv), vocab


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _use(actor: MegatronActor, pack: bool, budget: int) -> None:
    actor.cfg.pack_sequences, actor.cfg.max_tokens_per_micro_batch = pack, budget


def measure(actor: MegatronActor, batch: TrainBatch, budget: int, repeats: int) -> list[dict[str, float]]:
    """Rows for padded and packed at one budget; timings alternate padded / packed per repeat
    so that load from other processes hits both alike."""
    rows = []
    for pack in (False, True):
        _use(actor, pack, budget)
        mbs = actor._micro_batches(batch)
        rows.append({"pack_sequences": pack, "max_tokens_per_micro_batch": budget, **packing_stats(batch, mbs),
                     "micro_batches": float(len(mbs)), "row_length": float(mbs[0].tokens.shape[1])})
    if repeats < 1:
        return rows
    batch.old_logprobs = actor.compute_logprobs(batch)
    times: dict[tuple[bool, str], list[float]] = {}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for pack in (False, True):
            _use(actor, pack, budget)
            times.setdefault((pack, "compute_logprobs_s"), []).append(_seconds(lambda: actor.compute_logprobs(batch)))
            times.setdefault((pack, "train_step_s"), []).append(_seconds(lambda: actor.train_step(batch)))
    for row in rows:
        for (pack, key), values in times.items():
            if pack == row["pack_sequences"]:
                row[key] = round(statistics.median(values[1:]), 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--response-min", type=int, default=10)
    ap.add_argument("--response-max", type=int, default=48)
    ap.add_argument("--micro-batch-size", type=int, default=128)
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.repeats = 8, 1
    batch, vocab = arith_batch(args.prompts, args.group, args.response_min, args.response_max, seed=0)
    pstate = init_distributed(ParallelConfig(), seed=0)
    try:
        model = ModelConfig(hidden_size=128, num_layers=4, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=384)  # the tiny demo's policy
        trainer = TrainerConfig(micro_batch_size=args.micro_batch_size, lr=1e-4, warmup_ratio=0.0)
        actor = MegatronActor(model, trainer, AlgoConfig(kl_coef=0.0), pstate, vocab)
        actor.setup_optimizer(lr=1e-4, total_steps=100, warmup_steps=0)
        print(json.dumps({"sequences": batch.num_sequences, "padded_T": batch.tokens.shape[1]}), flush=True)
        for budget in args.budgets:
            for row in measure(actor, batch, budget, args.repeats):
                print(json.dumps(row), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
