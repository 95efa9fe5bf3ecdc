"""Supervised warm start: next-token likelihood on worked solutions, on the same Megatron actor,
optionally mixed with SPARK-format reward tasks (`warmstart.judge_fraction`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from spark_mcore.data.chat import encode_response
from spark_mcore.data.dataset import sft_examples
from spark_mcore.data.drill import compare_examples, drill_examples
from spark_mcore.rewards.countdown_trace import compare_text
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import dp_slice, pack_sequences
from spark_mcore.trainer.config import WarmStartConfig
from spark_mcore.types import Prompt, TrainBatch, prompt_kind

Example = tuple[Prompt, str]
# (prompts, count, seed) -> `count` reward-task examples with known answers, e.g.
# spark_mcore.spark.warmstart_data.judge_sft_examples (passed in by the assembly: the trainer
# does not depend on how SPARK renders its tasks).
JudgeExamples = Callable[[list[Prompt], int, int], list[Example]]
DRILL_POOL = 20000  # drill rows drawn per run (more than a warm start uses; reshuffled after)
# Reward-task examples built per run, at most: building is the slow part of a long warm start
# (a 100k-step run would build ~1M before step 1); past the pool they repeat, reshuffled.
# Every config and script stage in the repo plans fewer (<= ~12k), so the cap leaves them unchanged.
JUDGE_POOL = 20000
LOSS_WINDOW = 50  # batches of each kind in the running means of the loss


def judge_batches(steps: int, fraction: float) -> list[bool]:
    """Which of `steps` batches hold reward tasks. Batches are homogeneous: a reward-task prompt
    is 3-5x longer than an arith one, and every row is padded to the longest, so mixing them
    in one batch would multiply the cost of the worked-solution rows. The running count after
    batch j is round((j + 1) * fraction), so the share of reward-task examples stays within
    one batch of `fraction` (0.25 -> batches 1, 5, 9, ...)."""
    totals = [math.floor((j + 1) * fraction + 0.5) for j in range(steps)]
    return [t > (totals[j - 1] if j else 0) for j, t in enumerate(totals)]


def _endless(examples: list[Example], rng: random.Random) -> Iterator[Example]:
    pool = list(examples)
    while True:
        rng.shuffle(pool)
        yield from pool


def _with_drill(solutions: Iterator[Example], share: float, bound: int, seed: int,
                compare: float = 0.0, compare_bound: int = 99) -> Iterator[Example]:
    """`solutions` with each row replaced, with probability `share`, by an arithmetic drill row
    (`spark_mcore.data.drill`), a `compare` share of those a comparison drill row in the
    written check's format (`countdown_trace.compare_text`, targets up to `compare_bound`);
    share 0 returns `solutions` itself."""
    if share <= 0:
        return solutions
    pick = random.Random(f"drill-mix:{seed}")
    rows = drill_examples(DRILL_POOL, seed, bound=bound)
    if compare > 0:  # the pool's mix is the share (a seeded subset replaced)
        n = round(compare * len(rows))
        rows = rows[n:] + compare_examples(n, seed, compare_text, bound=compare_bound)
    drill = _endless(rows, random.Random(f"drill-order:{seed}"))
    return (next(drill) if pick.random() < share else next(solutions) for _ in iter(int, 1))


def sft_batches(prompts: list[Prompt], tokenizer: object, encode: object, batch_size: int,
                seed: int, judge_fraction: float = 0.0, steps: int = 0,
                judge_examples: JudgeExamples | None = None, drill_share: float = 0.0,
                drill_bound: int = 30, drill_compare: float = 0.0, compare_bound: int = 99
                ) -> Iterator[TrainBatch]:
    """Endless shuffled batches of (prompt, target) with the loss on the target only: worked
    solutions (a `drill_share` of them replaced by arithmetic drill rows) and, with
    `judge_fraction` > 0, batches of reward tasks (`judge_batches` over `steps` planned
    batches; batches after those repeat the plan), drawn from `judge_examples` (at most
    JUDGE_POOL of them, reshuffled when used up)."""
    if judge_fraction > 0 and judge_examples is None:
        raise ValueError("sft_batches: judge_fraction > 0 needs judge_examples (the reward-task source)")
    rng = random.Random(seed)
    solutions = _with_drill(_endless(sft_examples(prompts), rng), drill_share, drill_bound, seed, drill_compare,
                            compare_bound)
    plan = judge_batches(max(steps, 1), judge_fraction) if judge_fraction > 0 else [False]
    wanted = min(sum(plan) * batch_size, JUDGE_POOL)
    tasks = judge_examples(prompts, wanted, seed) if any(plan) and judge_examples else []
    judge = _endless(tasks, rng) if tasks else None
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    for j in range(10**12):
        source = judge if judge is not None and plan[j % len(plan)] else solutions
        chunk = [next(source) for _ in range(batch_size)]
        tokens, mask = pack_sequences([encode(p) for p, _ in chunk],
                                      [encode_response(tokenizer, s) for _, s in chunk], pad_id=pad)
        yield TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.zeros(len(chunk)),
                         kinds=[prompt_kind(p) for p, _ in chunk])


def warm_start(actor: MegatronActor, prompts: list[Prompt], tokenizer: object, encode: object,
               cfg: WarmStartConfig, seed: int, progress: bool = True,
               judge_examples: JudgeExamples | None = None,
               report: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Runs `cfg.steps` SFT steps; returns the last step's metrics (with `sft_loss_solution` and
    `sft_loss_judge`: running means over the last LOSS_WINDOW batches of each kind; `report`
    gets them every 100 steps). `should_stop` is asked after every step (on every rank: it may
    be collective); when it says yes the loop ends there and the metrics hold `stopped_after`,
    the steps done. `judge_examples` supplies the
    reward-task batches when `cfg.judge_fraction` > 0. Every rank draws the same global batches
    of `cfg.batch_size` rows and trains on its DP slice of each (the loss is normalised over
    the DP ranks), so DP ranks share the work of one process."""
    actor.setup_optimizer(cfg.lr, cfg.steps, cfg.warmup_steps)
    batches = sft_batches(prompts, tokenizer, encode, cfg.batch_size, seed, cfg.judge_fraction, cfg.steps,
                          judge_examples, cfg.drill_share, cfg.drill_bound, cfg.drill_compare,
                          cfg.drill_compare_bound)
    metrics: dict[str, float] = {}
    recent: dict[str, list[float]] = {"solution": [], "judge": []}  # loss per batch kind (homogeneous)
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        local = dp_slice(batch, actor.pstate.dp_rank, actor.pstate.dp_size)
        metrics = {**actor.sft_step(local), "rows_this_rank": float(local.num_sequences)}
        kind = "solution" if all(k == "policy" for k in batch.kinds) else "judge"
        recent[kind] = [*recent[kind], metrics["sft_loss"]][-LOSS_WINDOW:]
        metrics.update({f"sft_loss_{k}": sum(v) / len(v) for k, v in recent.items() if v})
        bar.set_postfix(loss=f"{metrics['sft_loss']:.3f}")
        if report is not None and ((step + 1) % 100 == 0 or step + 1 == cfg.steps):  # the judge loss must fall too
            report(f"warm start step {step + 1}/{cfg.steps}: loss " +
                   ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in recent.items() if v))
        if should_stop is not None and step + 1 < cfg.steps and should_stop():
            metrics["stopped_after"] = float(step + 1)
            break
    bar.close()
    return metrics
