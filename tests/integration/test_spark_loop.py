"""Three iterations of the real training loop with SPARK on (policy, reward, policy) on CPU, from
a warm start that mixes in SPARK-format reward tasks."""

import json
from pathlib import Path

import pytest

import spark_mcore.train as train_module
from spark_mcore.config.run import load_run_config
from spark_mcore.rewards import get_verifier
from spark_mcore.train import train
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.types import prompt_kind

MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64",
    "data.prompts_per_step=4", "data.train_size=64", "data.test_size=8", "data.levels=[1]",
    "rollout.n=4", "rollout.max_new_tokens=16", "warmstart.steps=2", "warmstart.batch_size=8",
    "warmstart.judge_fraction=0.25", "trainer.steps=2", "trainer.micro_batch_size=16",
    "eval.max_new_tokens=16", "eval.limit=4", "logging.progress=false", "logging.tensorboard=false",
    "spark.enabled=true", "spark.reward_batch_size=2", "checkpoint.export_hf=false",
]
KINDS = ("pointwise", "pairwise", "reflection")


def test_spark_loop_runs_a_reward_step_and_logs_per_kind_metrics(tmp_path: Path, capsys, monkeypatch) -> None:
    cfg = load_run_config(None, [*MICRO, f"checkpoint.dir={tmp_path}"])
    batches: list = []
    rollout = train_module.rollout

    def spy(run, request):  # type: ignore[no-untyped-def]
        step = rollout(run, request)
        batches.append(step.groups)
        return step

    monkeypatch.setattr(train_module, "rollout", spy)
    results = train(cfg)
    out = capsys.readouterr().out
    for line in ("[policy step 1, policy 1/2]", "[reward step 2, policy 1/2]", "[policy step 3, policy 2/2]"):
        assert line in out
    assert set(results) == {"start", "rl"} and results["rl"].num_prompts == 4

    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    first, reward, last = steps
    # policy step 1: 4 groups -> at most ceil(0.5 * 4) = 2 judge and 2 reflection tasks, all cached
    recycled = {k: first[f"spark/{k}"] for k in KINDS}
    assert recycled["pointwise"] + recycled["pairwise"] <= 2 and recycled["reflection"] <= 2
    assert first["spark/cache_size"] == sum(recycled.values()) >= 2
    assert "rollout/reward_policy" in first and not any(f"rollout/reward_{k}" in first for k in KINDS)
    # reward step 2: only the 2 oldest cached tasks, scored per kind, nothing recycled from them
    kinds = [k for k in KINDS if f"rollout/reward_{k}" in reward]
    assert kinds and "rollout/reward_policy" not in reward
    # the logged per-kind reward is the mean of the verifier's scores of that step's responses
    reward_rollouts = [r for g in batches[1] for r in g.rollouts]
    assert {prompt_kind(r.prompt) for r in reward_rollouts} == set(kinds)
    for r in reward_rollouts:
        assert r.reward == get_verifier(r.prompt.task)(r.completion.text, r.prompt.answer)
    for k in kinds:
        mine = [r.reward for r in reward_rollouts if prompt_kind(r.prompt) == k]
        assert reward[f"rollout/reward_{k}"] == pytest.approx(sum(mine) / len(mine))
    assert reward["spark/cache_size"] == first["spark/cache_size"] - 2
    assert not any(f"spark/{k}" in reward for k in KINDS)
    assert ("rollout/judge_accuracy" in reward) == any(k in kinds for k in ("pointwise", "pairwise"))
    assert "rollout/reward_policy" in last and "spark/pointwise" in last


def test_model_hf_path_starts_the_actor_and_engine_from_an_export(tmp_path: Path) -> None:
    """model.hf_path (used by tools/compare_spark_grpo.py to start both arms from one SFT
    export): the actor and the engine hold exactly the exported tensors; the checkpoint's
    config.json sets the sizes (a conflicting model.* size is ignored with a warning), and a
    config.json that does not describe the tensors is refused with the field named."""
    import torch
    from safetensors.torch import load_file

    from spark_mcore.checkpoint.io import export_hf
    from spark_mcore.config.loader import ConfigError
    from spark_mcore.distributed.parallel import destroy_distributed
    from spark_mcore.runtime import build_run

    def build(*extra: str):  # type: ignore[no-untyped-def]
        return build_run(load_run_config(None, [*MICRO, *extra]))

    src = build(f"checkpoint.dir={tmp_path / 'src'}", "trainer.seed=1")
    try:
        export_hf(src.actor, src.tokenizer, tmp_path / "src" / "hf", src.run_dir / "tokenizer",
                  tensors=src.actor.export_hf())
    finally:
        src.close()
        destroy_distributed()
    start = [f"model.hf_path={tmp_path / 'src' / 'hf'}", f"data.tokenizer={tmp_path / 'src' / 'tokenizer'}"]
    run = build(f"checkpoint.dir={tmp_path / 'dst'}", "trainer.seed=2", *start)
    try:
        saved = load_file(str(tmp_path / "src" / "hf" / "model.safetensors"))
        loaded = dict(run.actor.export_hf())
        assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
        engine = run.engine.state_dict()
        assert all(torch.equal(engine[k], saved[k]) for k in saved)
    finally:
        run.close()
        destroy_distributed()
    run = build(f"checkpoint.dir={tmp_path / 'sized'}", "model.hidden_size=64", "model.num_layers=3", *start)
    try:
        assert (run.cfg.model.hidden_size, run.cfg.model.num_layers) == (32, 2)  # MICRO's, from config.json
    finally:
        run.close()
        destroy_distributed()
    config = json.loads((tmp_path / "src" / "hf" / "config.json").read_text())
    (tmp_path / "src" / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ConfigError, match=r"model.hf_path=.*do not fit"):
        try:
            build(f"checkpoint.dir={tmp_path / 'bad'}", *start)
        finally:
            destroy_distributed()


def test_judge_check_demos_and_reward_lr_scale_reach_the_reward_step(tmp_path: Path, monkeypatch) -> None:
    """countdown with spark.judge_check + check_demo + reward_lr_scale: the reward step's judge
    groups are scored by `judge_check`, each gets the reference check as one more member, and the
    actor steps at the scaled lr in reward steps only."""
    cfg = load_run_config(None, [*MICRO, f"checkpoint.dir={tmp_path}", "data.source=builtin:countdown",
                                 "spark.judge_check=true", "spark.check_demo=true", "spark.reward_lr_scale=0.5",
                                 "spark.judge_per_prompt=1.0", "spark.reflection_per_prompt=0.0",
                                 "rollout.max_new_tokens=24"])
    updates: list = []
    update = train_module.update

    def spy(run, groups, version, off_policy=False, lr_scale=1.0, **kw):  # type: ignore[no-untyped-def]
        updates.append((groups, lr_scale))
        return update(run, groups, version, off_policy, lr_scale, **kw)

    monkeypatch.setattr(train_module, "update", spy)
    train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [lr for _, lr in updates] == [1.0, 0.5, 1.0]
    reward_groups = updates[1][0]
    assert reward_groups and all(g.prompt.task == "judge_check" for g in reward_groups)
    assert all(len(g.rollouts) == 4 + 1 for g in reward_groups)  # rollout.n + the demonstration
    for g in reward_groups:
        demo = g.rollouts[-1]
        assert demo.reward == 1.0 and demo.completion.text.endswith(f"\\boxed{{{json.loads(g.prompt.answer)['label']}}}")
    assert steps[1]["spark/check_demos"] == len(reward_groups) and "rollout/judge_verdict_accuracy" in steps[1]


def test_reward_n_and_reward_filter_zero_variance_reach_the_reward_step(tmp_path: Path, monkeypatch) -> None:
    """spark.reward_n samples that many responses per reward task (policy steps keep rollout.n);
    spark.reward_filter_zero_variance drops the reward step's groups of equal rewards from its
    GRPO batch and leaves the policy steps' batches whole."""
    cfg = load_run_config(None, [*MICRO, f"checkpoint.dir={tmp_path}", "spark.reward_n=6",
                                 "spark.reward_filter_zero_variance=true", "spark.reward_kl_coef=0.5"])
    batches: list = []
    to_batch = train_module.groups_to_batch
    kl_coefs: list = []
    train_step = MegatronActor.train_step

    def step_spy(actor, batch, lr_scale=1.0, kl_coef=None):  # type: ignore[no-untyped-def]
        kl_coefs.append((kl_coef, actor.algo.kl_coef))
        out = train_step(actor, batch, lr_scale, kl_coef)
        assert actor.algo.kl_coef == cfg.algo.kl_coef  # the override lasts one step
        return out

    monkeypatch.setattr(MegatronActor, "train_step", step_spy)
    update_kl: list = []
    update = train_module.update

    def update_spy(*args, **kw):  # type: ignore[no-untyped-def]
        update_kl.append(kw["kl_coef"])
        return update(*args, **kw)

    monkeypatch.setattr(train_module, "update", update_spy)

    def spy(groups, *args, **kw):  # type: ignore[no-untyped-def]
        batch, stats = to_batch(groups, *args, **kw)
        batches.append((groups, batch, stats, args[2]))
        return batch, stats

    monkeypatch.setattr(train_module, "groups_to_batch", spy)
    train(cfg)
    assert [flag for *_, flag in batches] == [False, True, False]  # filter_zero_variance per step
    # spark.reward_kl_coef in the reward step (when it has a batch left), algo.kl_coef elsewhere
    assert update_kl == [cfg.algo.kl_coef, 0.5, cfg.algo.kl_coef]
    assert {k for k, _ in kl_coefs} <= {cfg.algo.kl_coef, 0.5} and kl_coefs[0] == (cfg.algo.kl_coef, cfg.algo.kl_coef)
    assert all(len(g.rollouts) == 4 for i in (0, 2) for g in batches[i][0])  # policy steps: rollout.n
    groups, batch, stats, _ = batches[1]
    assert groups and all(len(g.rollouts) == 6 for g in groups)  # the reward step: spark.reward_n
    informative = [g for g in groups if len({r.reward for r in g.rollouts}) > 1]
    assert stats["zero_variance_groups"] == len(groups) - len(informative)
    rows = 0 if batch is None else batch.num_sequences
    assert rows == 6 * len(informative)  # only groups with a spread of rewards are trained on
    if batches[0][2]["zero_variance_groups"]:  # a policy step keeps its flat groups
        assert batches[0][1].num_sequences == 4 * len(batches[0][0])
