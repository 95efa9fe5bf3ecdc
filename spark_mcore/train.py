"""The training loop: GRPO on verified rollouts, with SPARK's recycled reward tasks.

    warm start (SFT) -> eval -> until `trainer.steps` policy steps are done:
        plan the step (policy | reward | policy + mixed-in reward tasks)
        generate n responses per prompt -> verify -> group-normalised advantages
        -> old/ref log-probs -> GRPO update on the Megatron actor -> push weights to the engine
        -> recycle the policy groups into pointwise / pairwise / reflection tasks (SPARK)
    -> eval -> save (dist checkpoint + HF export)

Under torchrun every rank runs this loop (any TP / PP / DP layout). Work is divided, not
repeated: each DP replica generates and verifies its share of a step's prompts and of the
held-out set (`rollout.divide.DividedRollout`), and trains on its slice of the warm-start and
GRPO batches; every rank sees all groups, so the plan, the batch and the SPARK cache are the
same everywhere. One writer: only global rank 0 prints and writes logs and result files.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from spark_mcore.algo.losses import logprob_mismatch
from spark_mcore.checkpoint.io import (
    checkpoint_root,
    export_hf,
    export_step_head,
    latest_checkpoint,
    load_actor_state,
    save_checkpoint,
)
from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import RunConfig
from spark_mcore.data.chat import encode_response
from spark_mcore.data.images import processor_config
from spark_mcore.distributed.parallel import destroy_distributed
from spark_mcore.distributed.signals import StopOnSignal
from spark_mcore.errors import Interrupted
from spark_mcore.eval.runner import EvalResult, evaluate_accuracy
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.divide import DividedRollout
from spark_mcore.rollout.groups import generate_groups, score_groups
from spark_mcore.rollout.source import StepRequest, StepRollouts
from spark_mcore.runtime import Run, build_run
from spark_mcore.spark.demos import with_check_demos
from spark_mcore.spark.loop import SparkState, kind_metrics
from spark_mcore.spark.own_judge import file_judge_examples, load_rows
from spark_mcore.spark.warmstart_data import judge_sft_examples
from spark_mcore.trainer.advantages import keep_prefix_advantages, refine_advantages
from spark_mcore.trainer.batching import dp_slice, groups_to_batch, sampled_mask, split_for_updates
from spark_mcore.trainer.warmstart import warm_start
from spark_mcore.types import KIND_KEY, Prompt, RolloutGroup, TrainBatch
from spark_mcore.weights.gather import actor_hf_weights

SUMMARY_KEYS = ["rollout/reward_mean", "rollout/accuracy", "rollout/judge_accuracy", "rollout/reflection_success",
                "rollout/response_len", "train/pg_loss", "train/kl", "train/entropy", "train/grad_norm",
                "spark/cache_size", "rollout/tokens_per_s", "time/rollout", "time/train", "time/trainer_idle",
                "stream/worker_idle", "rollout/logprob_mismatch"]


def say(run: Run, text: str) -> None:
    """One writer: only global rank 0 prints."""
    if run.pstate.rank == 0:
        print(text, flush=True)


def divided_evaluation(run: Run) -> DividedRollout:
    """Held-out generation + verification on this rank's engine, for this DP replica's share."""
    def produce(prompts: list[Prompt], params: SamplingParams) -> list[RolloutGroup]:
        groups = generate_groups(run.engine, prompts, run.encode, params)
        score_groups(groups, run.pool.score)
        return groups

    return DividedRollout(produce, run.pstate)


def evaluate(run: Run, produce: DividedRollout) -> EvalResult:
    before = produce.total_responses
    result = evaluate_accuracy(run.engine, run.test_prompts, run.encode, run.stop_ids, run.pool.score,
                               run.cfg.eval, produce=produce)
    run.logger.update({"responses_this_rank": produce.total_responses - before}, prefix="eval/")
    return result


def rollout(run: Run, request: StepRequest) -> StepRollouts:
    """The step's verified groups from the rollout source; logs reward, per-kind reward,
    lengths and throughput."""
    log = run.logger
    with log.timer("rollout"):
        step = run.source.collect(request)
    log.update(step.metrics)
    groups = step.groups
    rollouts = [r for g in groups for r in g.rollouts]
    policy = [r for r in rollouts if KIND_KEY not in r.prompt.meta] or rollouts
    gen_tokens = sum(len(r.completion.token_ids) for r in rollouts)
    log.update({"reward_mean": sum(r.reward for r in rollouts) / len(rollouts),
                "accuracy": sum(r.correct for r in policy) / len(policy),
                "response_len": gen_tokens / len(rollouts),
                "truncated": sum(r.completion.finish_reason == "length" for r in rollouts) / len(rollouts),
                "tokens_per_s": gen_tokens / max(log.current["time/rollout"], 1e-9),
                **kind_metrics(rollouts)}, prefix="rollout/")
    return step


def batch_logprobs(run: Run, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
    """[B, T] log-probs of every row of the global `batch` (policy or reference): each DP rank
    computes those of its slice, then the slices are all-gathered over the DP group (refining
    advantages needs whole groups, and every rank splits the same batch into updates)."""
    ps = run.pstate
    return dp_gather_rows(run, batch, run.actor.compute_logprobs(dp_slice(batch, ps.dp_rank, ps.dp_size),
                                                                 reference=reference))


def batch_logprobs_entropy(run: Run, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_logprobs` of the policy and its per-token entropy [B, T], from one forward pass
    (Prefix-RFT keeps the advantage of the batch's highest-entropy prefix tokens)."""
    ps = run.pstate
    logp, ent = run.actor.compute_logprobs_entropy(dp_slice(batch, ps.dp_rank, ps.dp_size))
    return dp_gather_rows(run, batch, logp), dp_gather_rows(run, batch, ent)


def dp_gather_rows(run: Run, batch: TrainBatch, local: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of a per-row tensor computed on this DP rank's `dp_slice`."""
    ps = run.pstate
    if ps.dp_size == 1:
        return local
    parts = [torch.empty_like(local, device=ps.device) for _ in range(ps.dp_size)]
    dist.all_gather(parts, local.to(ps.device).contiguous(), group=ps.dp_group)
    return torch.cat([p.cpu() for p in parts])[: batch.num_sequences]


def update(run: Run, groups: list[RolloutGroup], version: int, off_policy: bool = False,
           lr_scale: float = 1.0, filter_zero_variance: bool | None = None, kl_coef: float | None = None) -> None:
    """One GRPO update of the actor on `groups`, then the new weights go to the engine.
    `off_policy`: the groups may be older than the actor (async), so the policy term is
    corrected by truncated importance sampling against the engine's log-probs. Every rank
    builds the same global batch and update split and trains on its DP slice of each update
    (the actor normalises the loss over DP ranks). `lr_scale`: times the scheduled lr.
    `filter_zero_variance`: drop groups of equal rewards (None = `algo.filter_zero_variance`);
    `kl_coef`: the KL coefficient of this update (None = `algo.kl_coef`)."""
    algo, log, ps = run.cfg.algo, run.logger, run.pstate
    flat = algo.filter_zero_variance if filter_zero_variance is None else filter_zero_variance
    batch, stats = groups_to_batch(groups, algo.adv_eps, algo.normalize_std, flat,
                                   pad_id=run.tokenizer.pad_token_id or 0,
                                   images_of=getattr(run.encode, "images", None), prefix=run.cfg.rollout.prefix.enabled,
                                   steps_of=run.step_finder)
    log.update(stats, prefix="rollout/")
    if batch is not None:
        with log.timer("train"):
            entropy = None
            if batch.prefix_mask is not None and bool(batch.prefix_mask.any()):  # Prefix-RFT
                batch.old_logprobs, entropy = batch_logprobs_entropy(run, batch)
            else:
                batch.old_logprobs = batch_logprobs(run, batch)
            if batch.engine_logprobs is not None:
                log.update(logprob_mismatch(batch.old_logprobs, batch.engine_logprobs, sampled_mask(batch)), "rollout/")
                batch.engine_logprobs = batch.engine_logprobs if off_policy else None
            if run.actor.ref_chunks is not None:
                batch.ref_logprobs = batch_logprobs(run, batch, reference=True)
            log.update(refine_advantages(batch, algo), prefix="train/")  # SPRO: per-token advantages
            if batch.prefix_mask is not None:  # only the high-entropy prefix tokens keep their advantage
                log.update(keep_prefix_advantages(batch, entropy, run.cfg.rollout.prefix.entropy_keep), "train/")
            # several optimizer steps per rollout batch: later ones are off-policy w.r.t. the
            # old log-probs above, which is what the PPO clip is for
            steps = [run.actor.train_step(dp_slice(mini, ps.dp_rank, ps.dp_size), lr_scale=lr_scale, kl_coef=kl_coef)
                     for mini in
                     split_for_updates(batch, run.cfg.trainer.updates_per_step, seed=version)]
            keys = dict.fromkeys(k for s in steps for k in s)  # the step head's only where it had steps
            means = {k: sum(s[k] for s in steps if k in s) / sum(k in s for s in steps) for k in keys}
            log.update({k: v for k, v in means.items() if not k.startswith("step_head/")}, prefix="train/")
            log.update({k: v for k, v in means.items() if k.startswith("step_head/")})
    with log.timer("sync"):
        run.push_weights(version)


def prepare(run: Run, spark: SparkState, produce: DividedRollout, stop: StopOnSignal
            ) -> tuple[int, int, dict[str, EvalResult]]:
    """Resumes from the newest checkpoint in the run directory, or warm-starts and evaluates.
    Returns (iteration, policy steps done, results so far). A stop signal during the warm start
    ends it after the current SFT step with `Interrupted` (it keeps no checkpoint)."""
    cfg = run.cfg
    updates = spark.total_updates(cfg.trainer.steps) * cfg.trainer.updates_per_step
    ckpt = latest_checkpoint(run.run_dir) if cfg.checkpoint.resume else None
    if ckpt is None and cfg.warmstart.steps:
        start = time.perf_counter()
        judge = partial(judge_sft_examples, kinds=tuple(cfg.warmstart.judge_kinds))
        if cfg.warmstart.judge_file:  # the model's own answers (an earlier stage's), mixed in
            try:
                rows = load_rows(cfg.warmstart.judge_file)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            judge = file_judge_examples(rows, cfg.warmstart.judge_file_share, judge_sft_examples)
        last = warm_start(run.actor, run.loader.prompts, run.tokenizer, run.encode, cfg.warmstart, cfg.data.seed,
                          cfg.logging.progress and run.pstate.rank == 0, judge_examples=judge,
                          report=lambda msg: say(run, msg), should_stop=stop.should_stop)
        if "stopped_after" in last:
            raise Interrupted(stop.requested or "signal", stop.signum, None,
                              f" during the warm start, after SFT step {last['stopped_after']:.0f}/{cfg.warmstart.steps}"
                              " (the warm start keeps no checkpoint: the same command starts it again)")
        run.logger.update({k: v for k, v in last.items() if k.startswith(("sft_loss", "rows_this_rank"))},
                          prefix="warmstart/")
        say(run, f"warm start: {cfg.warmstart.steps} SFT steps in {time.perf_counter() - start:.1f}s")
    run.actor.setup_optimizer(cfg.trainer.lr, updates, math.ceil(cfg.trainer.warmup_ratio * updates))
    run.actor.snapshot_reference()
    if ckpt is None:
        run.push_weights(0)
        results = {"start": evaluate(run, produce)}
        if run.pstate.rank == 0:
            results["start"].write(run.run_dir / "eval_start.json")
        say(run, f"held-out accuracy before RL: {results['start'].summary()}")
        return 0, 0, results
    state = load_actor_state(run.actor, ckpt)
    run.loader.load_state_dict(state["loader"])
    spark.load_state_dict(state["spark"])
    run.source.load_state_dict(state.get("source", {}))  # prompts taken but not trained: issued again
    run.push_weights(state["iteration"])
    say(run, f"resumed from {ckpt} (policy step {state['policy_steps']}/{cfg.trainer.steps})")
    start_file = run.run_dir / "eval_start.json"
    return state["iteration"], state["policy_steps"], ({"start": EvalResult.read(start_file)}
                                                      if start_file.is_file() else {})


def checkpoint(run: Run, it: int, state: dict) -> Path:
    return save_checkpoint(run.actor, run.run_dir, it, state, keep_last=run.cfg.checkpoint.keep_last,
                           policy_version=run.policy_version)


def train(cfg: RunConfig) -> dict[str, EvalResult]:
    """Runs the whole job; returns held-out results after the warm start and after RL.
    After a stop signal (`checkpoint.save_on_signal`) the current step finishes, a checkpoint
    is saved and `Interrupted` names it."""
    try:
        run = build_run(cfg)
    except BaseException:  # e.g. a bad dataset row: no Run to close, but the process group exists
        destroy_distributed()
        raise
    stop = StopOnSignal(cfg.checkpoint.save_on_signal, announce=run.pstate.rank == 0)
    stop.__enter__()
    try:
        spark = SparkState(cfg.spark, cfg.data.prompts_per_step)
        produce = divided_evaluation(run)
        it, policy_steps, results = prepare(run, spark, produce, stop)
        params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=run.stop_ids)
        bar = tqdm(total=cfg.trainer.steps, initial=policy_steps, desc="RL policy steps",
                   disable=not (cfg.logging.progress and run.pstate.rank == 0), dynamic_ncols=True)
        saved_it = -1
        while policy_steps < cfg.trainer.steps:
            if stop.should_stop():  # collective: every rank stops after the same step
                where = checkpoint(run, it, trainer_state(run, spark, it, policy_steps)) if saved_it != it \
                    else checkpoint_root(run.run_dir) / f"step_{it}"
                raise Interrupted(stop.requested or "signal", stop.signum, str(where),
                                  f" after policy step {policy_steps}/{cfg.trainer.steps}")
            plan, reward_prompts = spark.plan()
            params.seed = cfg.trainer.seed * 100003 + it  # sampling is a function of the iteration
            n = cfg.spark.samples_per_task(plan.kind, cfg.rollout.n)  # spark.reward_n in reward steps
            step = rollout(run, StepRequest(it, policy_steps, plan.kind == "policy", reward_prompts,
                                            params if n == params.n else replace(params, n=n)))
            run.logger.update(spark.after_step(plan, step.groups, policy_steps, step.candidates))
            run.source.prefetch(*spark.peek())  # async sources start on the next step's prompts now
            groups = step.groups
            if cfg.spark.check_demo and plan.kind != "policy":  # a documented deviation (spark/demos.py)
                groups, demos = with_check_demos(groups, lambda text: encode_response(run.tokenizer, text))
                run.logger.update({"spark/check_demos": float(demos)})
            update(run, groups, version=it + 1, off_policy=step.off_policy,
                   lr_scale=1.0 if plan.kind == "policy" else cfg.spark.reward_lr_scale,
                   filter_zero_variance=cfg.spark.drops_flat_groups(plan.kind, cfg.algo.filter_zero_variance),
                   kl_coef=cfg.spark.kl_coef(plan.kind, cfg.algo.kl_coef))
            policy_steps, it = policy_steps + (plan.kind == "policy"), it + 1
            bar.update(plan.kind == "policy")
            run.logger.flush(it, f"[{plan.kind} step {it}, policy {policy_steps}/{cfg.trainer.steps}]",
                             SUMMARY_KEYS)
            interval = cfg.checkpoint.save_interval
            if plan.kind == "policy" and interval and policy_steps % interval == 0 and policy_steps < cfg.trainer.steps:
                checkpoint(run, it, trainer_state(run, spark, it, policy_steps))
                saved_it = it
        bar.close()
        results["rl"] = evaluate(run, produce)
        if run.pstate.rank == 0:  # small: written before the checkpoint needs the disk
            results["rl"].write(run.run_dir / "eval_rl.json")
        checkpoint(run, it, trainer_state(run, spark, it, policy_steps))
        if cfg.checkpoint.export_hf:
            processing = getattr(run.encode, "processing", None)  # vision-language runs
            export_hf(run.actor, run.tokenizer, run.run_dir / "hf", run.run_dir / "tokenizer",
                      tensors=actor_hf_weights(run.actor),
                      processor_config=processor_config(processing) if processing is not None else None)
            if cfg.model.step_head:
                export_step_head(run.actor, run.run_dir / "hf")
        if run.pstate.rank == 0:
            print_results_table(results)
        return results
    finally:
        stop.__exit__()
        run.close()
        destroy_distributed()


def trainer_state(run: Run, spark: SparkState, it: int, policy_steps: int) -> dict[str, object]:
    return {"iteration": it, "policy_steps": policy_steps, "loader": run.loader.state_dict(),
            "spark": spark.state_dict(), "source": run.source.state_dict()}


def print_results_table(results: dict[str, EvalResult]) -> None:
    labels = {"start": "after SFT warm start", "rl": "after RL"}
    sampled = next((r.sampled_n for r in results.values() if r.sampled_n), 0)
    extra = f" sampled accuracy (mean of {sampled}/prompt) |" if sampled else ""
    print(f"\n| model | held-out accuracy (greedy) |{extra} mean response tokens |\n|---|---|{'---|' if sampled else ''}---|")
    for name, res in results.items():
        cell = "" if not sampled else (f" {res.sampled_accuracy:.3f} |" if res.sampled_accuracy is not None else " - |")
        print(f"| {labels.get(name, name)} | {res.accuracy:.3f} ({res.num_prompts} prompts) |{cell} "
              f"{res.mean_response_tokens:.1f} |")
