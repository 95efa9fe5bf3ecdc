"""The training loop: GRPO on verified rollouts, read top to bottom as the algorithm.

    warm start (SFT) -> eval -> for each policy step:
        generate n responses per prompt -> verify -> group-normalised advantages
        -> old/ref log-probs -> GRPO update on the Megatron actor -> push weights to the engine
    -> eval -> save (dist checkpoint + HF export)
"""

from __future__ import annotations

import math
import time

from tqdm import tqdm

from spark_mcore.checkpoint.io import export_hf, save_checkpoint
from spark_mcore.config.run import RunConfig
from spark_mcore.distributed.parallel import destroy_distributed
from spark_mcore.eval.runner import EvalResult, evaluate_accuracy
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.groups import generate_groups, score_groups
from spark_mcore.runtime import Run, build_run
from spark_mcore.trainer.batching import groups_to_batch
from spark_mcore.trainer.warmstart import warm_start

SUMMARY_KEYS = ["rollout/reward_mean", "rollout/accuracy", "rollout/response_len", "train/pg_loss",
                "train/kl", "train/entropy", "train/clip_frac", "train/grad_norm", "rollout/tokens_per_s",
                "time/rollout", "time/train"]


def evaluate(run: Run) -> EvalResult:
    return evaluate_accuracy(run.engine, run.test_prompts, run.encode, run.stop_ids, run.pool.score,
                             run.cfg.eval)


def policy_step(run: Run, step: int, params: SamplingParams) -> dict[str, float]:
    """One GRPO step; returns its metrics (also written to the logger)."""
    log, cfg = run.logger, run.cfg
    prompts = next(run.loader)
    with log.timer("rollout"):
        groups = generate_groups(run.engine, prompts, run.encode, params)
    with log.timer("verify"):
        score_groups(groups, run.pool.score)
    rollouts = [r for g in groups for r in g.rollouts]
    gen_tokens = sum(len(r.completion.token_ids) for r in rollouts)
    log.update({"reward_mean": sum(r.reward for r in rollouts) / len(rollouts),
                "accuracy": sum(r.correct for r in rollouts) / len(rollouts),
                "response_len": gen_tokens / len(rollouts),
                "truncated": sum(r.completion.finish_reason == "length" for r in rollouts) / len(rollouts),
                "tokens_per_s": gen_tokens / max(log.current["time/rollout"], 1e-9)}, prefix="rollout/")
    batch, stats = groups_to_batch(groups, cfg.algo.adv_eps, cfg.algo.normalize_std,
                                   cfg.algo.filter_zero_variance, pad_id=run.tokenizer.pad_token_id or 0)
    log.update(stats, prefix="rollout/")
    if batch is not None:
        with log.timer("train"):
            batch.old_logprobs = run.actor.compute_logprobs(batch)
            if run.actor.ref is not None:
                batch.ref_logprobs = run.actor.compute_logprobs(batch, reference=True)
            log.update(run.actor.train_step(batch), prefix="train/")
    with log.timer("sync"):
        run.engine.update_weights(run.actor.export_hf(), version=step + 1)
    return log.flush(step, f"[step {step + 1}/{cfg.trainer.steps}]", SUMMARY_KEYS)


def train(cfg: RunConfig) -> dict[str, EvalResult]:
    """Runs the whole job; returns held-out results after the warm start and after RL."""
    run = build_run(cfg)
    try:
        results: dict[str, EvalResult] = {}
        progress = cfg.logging.progress and run.pstate.rank == 0
        if cfg.warmstart.steps:
            start = time.perf_counter()
            warm_start(run.actor, run.loader.prompts, run.tokenizer, run.encode, cfg.warmstart,
                       cfg.data.seed, progress)
            run.engine.update_weights(run.actor.export_hf(), version=0)
            print(f"warm start: {cfg.warmstart.steps} SFT steps in {time.perf_counter() - start:.1f}s")
        results["start"] = evaluate(run)
        print(f"held-out accuracy before RL: {results['start'].accuracy:.3f}", flush=True)
        warmup = math.ceil(cfg.trainer.warmup_ratio * cfg.trainer.steps)
        run.actor.setup_optimizer(cfg.trainer.lr, cfg.trainer.steps, warmup)
        run.actor.snapshot_reference()
        params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=run.stop_ids)
        for step in tqdm(range(cfg.trainer.steps), desc="GRPO", disable=not progress, dynamic_ncols=True):
            params.seed = cfg.trainer.seed * 100003 + step
            policy_step(run, step, params)
        results["rl"] = evaluate(run)
        save_checkpoint(run, step=cfg.trainer.steps)
        if cfg.checkpoint.export_hf:
            export_hf(run, run.run_dir / "hf")
        print_results_table(results)
        for name, res in results.items():
            res.write(run.run_dir / f"eval_{name}.json")
        return results
    finally:
        run.close()
        destroy_distributed()


def print_results_table(results: dict[str, EvalResult]) -> None:
    labels = {"start": "after SFT warm start", "rl": "after GRPO"}
    print("\n| model | held-out accuracy (greedy) | mean response tokens |\n|---|---|---|")
    for name, res in results.items():
        print(f"| {labels.get(name, name)} | {res.accuracy:.3f} ({res.num_prompts} prompts) | "
              f"{res.mean_response_tokens:.1f} |")
