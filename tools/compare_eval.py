"""The evaluation of tools/compare_spark_grpo.py: every number of its table for one HF export,
and the fixed judge set built from the warm start's own samples (shared by every seed and arm,
or one per seed)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class EvalSetup:
    """What every evaluation shares: held-out prompts and the decoding settings."""

    prompts: list[Any]
    samples: int
    temperature: float
    max_new_tokens: int
    rounds: int
    judge_set: str
    judge_rows: int


def sampled_groups(model: Any, setup: EvalSetup, seed: int) -> list[Any]:
    """`setup.samples` verified responses per held-out prompt at the rollout temperature."""
    from spark_mcore.rewards import RewardConfig, VerifierPool
    from spark_mcore.rollout.base import SamplingParams
    from spark_mcore.rollout.groups import generate_groups, score_groups

    params = SamplingParams(n=setup.samples, temperature=setup.temperature, max_new_tokens=setup.max_new_tokens,
                            stop_token_ids=model.stop_ids, seed=seed)
    groups = generate_groups(model.engine, setup.prompts, model.encode, params)
    with VerifierPool(RewardConfig()) as pool:
        score_groups(groups, pool.score)
    return groups


def judge_rows_from(groups: list[Any], setup: EvalSetup, seed: int) -> Any:
    """A judge set from the warm start's own samples (or synthetic for arith)."""
    from spark_mcore.eval.reward_bench import heldout_from_groups

    if setup.judge_set == "synthetic":
        from spark_mcore.eval.judge_eval import arith_judge_set

        return arith_judge_set(setup.prompts, seed=seed, limit=setup.judge_rows)
    rows = heldout_from_groups(groups, seed=seed, max_rows=setup.judge_rows)
    if not rows.pairs:
        raise RuntimeError("the warm start's samples hold no prompt with both a right and a wrong response, "
                           "so there is no judge set: strengthen the warm start or use --judge-set synthetic")
    return rows


def build_judge_set(groups: list[Any], setup: EvalSetup, seed: int, out: Path) -> Any:
    """The seed's own fixed judge set (`--per-seed-judge-set`); saved as JSONL next to the runs."""
    from spark_mcore.eval.reward_bench import save_jsonl

    rows = judge_rows_from(groups, setup, seed)
    save_jsonl(rows.pairs, out / "judge_pairs.jsonl")
    save_jsonl(rows.points, out / "judge_points.jsonl")
    return rows


def judge_set_dir(out: Path, sft_dir: Path, setup: EvalSetup, seed: int) -> Path:
    """<out>/judgeset-<key>: the key hashes the warm start's directory (itself keyed by its
    config), the held-out prompts, the sampling settings and the sampling seed."""
    key = [sft_dir.name, [(p.id, p.answer) for p in setup.prompts], setup.samples, setup.temperature,
           setup.max_new_tokens, setup.judge_set, setup.judge_rows, seed]
    return out / f"judgeset-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]}"


def shared_judge_rows(out: Path, sft_dir: Path, setup: EvalSetup, seed: int) -> Any:
    """The ONE judge set of every seed and arm (`--shared-warm-start`): the warm start's
    `setup.samples` answers per held-out prompt with sampling seed `seed`, built by the first
    seed process that gets here and loaded by the others (`spark_mcore.eval.judge_set`)."""
    from spark_mcore.eval.judge_set import shared_judge_set

    def build() -> Any:
        if setup.judge_set == "synthetic":
            return judge_rows_from([], setup, seed)
        from spark_mcore.eval.cli import open_model

        model = open_model(str(sft_dir / "hf"))
        try:
            groups = sampled_groups(model, setup, seed)
        finally:
            model.engine.shutdown()
        return judge_rows_from(groups, setup, seed)

    path = judge_set_dir(out, sft_dir, setup, seed)
    rows, built = shared_judge_set(path, build, {"warm_start": str(sft_dir), "prompts": len(setup.prompts),
                                                 "samples": setup.samples, "seed": seed})
    print(f"  shared judge set {'built' if built else 'loaded'}: {len(rows.pairs)} pairs, {len(rows.points)} "
          f"pointwise rows -> {path}", flush=True)
    return rows


def evaluate(hf_dir: Path, setup: EvalSetup, seed: int, judge_rows: Any | None, out: Path
             ) -> tuple[dict[str, float], Any]:
    """Every number of the table for one HF export; builds the judge set when `judge_rows` is
    None (the warm start). Returns (metrics, judge rows)."""
    from spark_mcore.eval.cli import open_model
    from spark_mcore.eval.judge_eval import judge_eval, self_reflect_eval

    model = open_model(str(hf_dir))
    try:
        groups = sampled_groups(model, setup, seed)
        rows = judge_rows if judge_rows is not None else build_judge_set(groups, setup, seed, out)
        params = model.params(setup.max_new_tokens)
        sr = self_reflect_eval(model.engine, model.encode, setup.prompts, params, rounds=setup.rounds)
        judge = judge_eval(model.engine, model.encode, rows, params).summary()
    finally:
        model.engine.shutdown()
    rewards = [r.reward for g in groups for r in g.rollouts]
    greedy, after = sr.accuracy_before or 0.0, sr.accuracy_after or 0.0
    pointwise, pairwise = judge["judge/pointwise_accuracy"], judge["judge/pairwise_accuracy"]
    return {"greedy": greedy, "avg_n": sum(rewards) / len(rewards), "pointwise": pointwise,
            "pairwise": pairwise, "judge": (pointwise + pairwise) / 2, "self_reflect": after,
            "sr_delta": after - greedy, "pairwise_both": judge["judge/pairwise_both_orders"],
            "pairwise_a_rate": judge["judge/pairwise_a_rate"],
            "pointwise_yes": judge.get("judge/pointwise_accuracy_yes", float("nan")),
            "pointwise_no": judge.get("judge/pointwise_accuracy_no", float("nan")),
            "judge_unparsable": judge["judge/pointwise_unparsable"],
            "reject_right": _num(sr.reject_rate_on_right), "reject_wrong": _num(sr.reject_rate_on_wrong),
            "judge_rows": float(len(rows.pairs))}, rows


def _num(value: float | None) -> float:
    return float("nan") if value is None else value
