"""RewardCache (FIFO, bound, checkpoint state) and the policy/reward step scheduler."""

from __future__ import annotations

import json

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.spark.cache import RewardCache
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.schedule import SparkSchedule, StepPlan
from spark_mcore.types import Prompt, RewardSample


def sample(i: int, kind: str = "pointwise") -> RewardSample:
    label = {"pointwise": "Yes", "pairwise": "B", "reflection": str(i)}[kind]
    prompt = Prompt(
        id=f"s{i}",
        messages=[{"role": "user", "content": f"task {i}"}],
        answer=label,
        task="judge" if kind != "reflection" else "math",
        images=["x.png"] if i % 2 else [],
        meta={"spark_kind": kind, "source_rollouts": [0, 1], "step": i},
    )
    return RewardSample(kind=kind, prompt=prompt, source_prompt_id=f"src{i}", label=label)  # type: ignore[arg-type]


def test_cache_fifo_ready_pop() -> None:
    c = RewardCache(max_size=10)
    c.add([sample(i) for i in range(3)])
    c.add([sample(3, "reflection")])
    assert len(c) == 4 and c.ready(4) and not c.ready(5) and not c.ready(0)
    assert [s.prompt.id for s in c.pop(3)] == ["s0", "s1", "s2"]
    assert [s.prompt.id for s in c.pop(1)] == ["s3"]
    assert len(c) == 0 and c.pop(0) == []
    with pytest.raises(ValueError, match="ready"):
        c.pop(1)
    with pytest.raises(TypeError, match="RewardSample"):
        c.add(["not a sample"])  # type: ignore[list-item]


def test_cache_bound_drops_oldest_and_counts() -> None:
    c = RewardCache(max_size=3)
    c.add([sample(i) for i in range(5)])
    c.add([sample(5)])
    assert (len(c), c.added, c.dropped) == (3, 6, 3)
    assert [s.prompt.id for s in c.pop(3)] == ["s3", "s4", "s5"]
    with pytest.raises(ValueError, match="cache_max"):
        RewardCache(0)


def test_cache_state_round_trip_through_json() -> None:
    c = RewardCache(max_size=8)
    c.add([sample(0), sample(1, "pairwise"), sample(2, "reflection")])
    c.pop(1)
    state = json.loads(json.dumps(c.state_dict()))
    d = RewardCache(max_size=8)
    d.load_state_dict(state)
    assert (len(d), d.added, d.dropped) == (2, 3, 0)
    assert d.pop(2) == [sample(1, "pairwise"), sample(2, "reflection")]
    small = RewardCache(max_size=1)
    small.load_state_dict(state)  # a smaller bound trims the oldest
    assert [s.prompt.id for s in small.pop(1)] == ["s2"] and small.dropped == 1


@pytest.mark.parametrize(
    "state, msg",
    [
        ({"version": 99}, "version"),
        ({"version": 1, "samples": [{"kind": "pointwise"}]}, r"samples\[0\] lacks 'label'"),
        (
            {
                "version": 1,
                "samples": [{"kind": "judge", "label": "A", "source_prompt_id": "x", "prompt": {}}],
            },
            "kind",
        ),
        (
            {
                "version": 1,
                "samples": [
                    {"kind": "pairwise", "label": "A", "source_prompt_id": "x", "prompt": {"id": "x"}}
                ],
            },
            "Prompt record",
        ),
    ],
)
def test_cache_rejects_bad_state(state: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        RewardCache(4).load_state_dict(state)


def test_schedule_disabled_is_plain_grpo() -> None:
    s = SparkSchedule(SparkConfig(enabled=False), prompts_per_step=4)
    assert s.next_step(cache_size=100, last_kind="policy") == StepPlan("policy", 0)


def test_schedule_alternate() -> None:
    s = SparkSchedule(SparkConfig(enabled=True, reward_batch_size=4, cache_max=16), prompts_per_step=8)
    assert s.next_step(10, None) == StepPlan("policy", 0)  # the first step is a policy step
    assert s.next_step(3, "policy") == StepPlan("policy", 0)
    assert s.next_step(4, "policy") == StepPlan("reward", 4)
    assert s.next_step(12, "reward") == StepPlan("policy", 0)  # never two reward steps in a row
    with pytest.raises(ValueError, match="last_kind"):
        s.next_step(0, "judge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="spark.cache_max"):
        SparkSchedule(SparkConfig(enabled=True, cache_max=4), prompts_per_step=8)


def test_schedule_alternate_simulation_with_cache() -> None:
    # 4 prompts per step, the recycler yields 3 samples per policy step, reward batch = 4
    s = SparkSchedule(SparkConfig(enabled=True, cache_max=64), prompts_per_step=4)
    cache = RewardCache(64)
    kinds, last = [], None
    for _ in range(8):
        plan = s.next_step(len(cache), last)
        if plan.kind == "reward":
            cache.pop(plan.reward_samples)
        else:
            cache.add([sample(i) for i in range(3)])
        kinds.append(plan.kind)
        last = plan.kind
    # cache after each step: 3, 6 -> reward(2), 5 -> reward(1), 4 -> reward(0), 3, 6 -> ...
    assert kinds == ["policy", "policy", "reward", "policy", "reward", "policy", "reward", "policy"]


def test_schedule_mixed() -> None:
    s = SparkSchedule(SparkConfig(enabled=True, schedule="mixed", mixed_ratio=0.5), prompts_per_step=16)
    assert s.next_step(0, None) == StepPlan("policy", 0)
    assert s.next_step(5, "policy") == StepPlan("policy", 5)
    assert s.next_step(100, "policy") == StepPlan("policy", 8)
    tiny = SparkSchedule(SparkConfig(enabled=True, schedule="mixed", mixed_ratio=0.1), prompts_per_step=2)
    assert tiny.next_step(3, "policy") == StepPlan("policy", 1)  # at least one when available


def test_reward_step_settings_default_to_the_policy_step_ones() -> None:
    cfg = SparkConfig(enabled=True)
    assert cfg.samples_per_task("reward", 8) == cfg.samples_per_task("policy", 8) == 8
    assert not cfg.drops_flat_groups("reward", False) and not cfg.drops_flat_groups("policy", False)
    assert cfg.drops_flat_groups("reward", True) and cfg.drops_flat_groups("policy", True)  # algo's switch


def test_reward_n_and_reward_filter_apply_to_reward_steps_only() -> None:
    cfg = SparkConfig(enabled=True, reward_n=16, reward_filter_zero_variance=True)
    assert cfg.samples_per_task("reward", 8) == 16 and cfg.samples_per_task("policy", 8) == 8
    assert cfg.drops_flat_groups("reward", False) and not cfg.drops_flat_groups("policy", False)


@pytest.mark.parametrize("fields, msg", [
    ({"reward_n": 1}, "spark.reward_n must be 0"),
    ({"reward_n": -2}, "spark.reward_n must be 0"),
    ({"reward_n": 8, "schedule": "mixed"}, "spark.reward_n needs spark.schedule: alternate"),
])
def test_reward_n_is_validated(fields: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        SparkConfig(enabled=True, **fields)


def test_reward_kl_coef_applies_to_reward_steps_only() -> None:
    assert SparkConfig(enabled=True).kl_coef("reward", 0.001) == 0.001  # None: algo.kl_coef
    cfg = SparkConfig(enabled=True, reward_kl_coef=0.2)
    assert cfg.kl_coef("reward", 0.001) == 0.2 and cfg.kl_coef("policy", 0.001) == 0.001
    with pytest.raises(ConfigError, match="spark.reward_kl_coef must be in"):
        SparkConfig(enabled=True, reward_kl_coef=-1.0)


def test_reward_kl_coef_needs_the_reference() -> None:
    from spark_mcore.config.run import load_run_config

    with pytest.raises(ConfigError, match="algo.kl_coef > 0"):
        load_run_config(None, ["spark.enabled=true", "spark.reward_kl_coef=0.1", "algo.kl_coef=0"])
    assert load_run_config(None, ["spark.enabled=true", "spark.reward_kl_coef=0.1"]).spark.reward_kl_coef == 0.1
