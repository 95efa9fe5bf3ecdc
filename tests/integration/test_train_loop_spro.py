"""SPRO (algo.advantage=spro) through the real loop: per-token advantages reach the actor, the
reference is kept with kl_coef 0, and the process term appears once the policy moved."""

import json
import zlib
from pathlib import Path

import spark_mcore.train as train_module
from spark_mcore.config.run import load_run_config
from spark_mcore.train import train

MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64",
    "data.prompts_per_step=4", "data.train_size=64", "data.test_size=4", "data.levels=[1]",
    "rollout.n=4", "rollout.max_new_tokens=12", "warmstart.steps=2", "warmstart.batch_size=8",
    "trainer.steps=2", "trainer.micro_batch_size=8", "eval.max_new_tokens=12", "eval.samples=0",
    "logging.progress=false", "checkpoint.export_hf=false",
]


def test_spro_two_steps_end_to_end(tmp_path: Path, monkeypatch) -> None:
    cfg = load_run_config(None, [*MICRO, f"checkpoint.dir={tmp_path}", "algo.advantage=spro",
                                 "algo.spro_beta=0.5", "algo.kl_coef=0",
                                 "trainer.warmup_ratio=0"])  # no warmup: step 1 moves the policy
    seen: list[tuple[int, ...]] = []
    runs = []
    build_run = train_module.build_run

    def spy_build(c):
        run = build_run(c)
        # mixed rewards (parity of the text): the tiny model answers nothing right after 2 SFT steps
        run.pool.score = lambda items: [float(zlib.crc32(text.encode()) % 2) for _, text, _ in items]
        step = run.actor.train_step
        run.actor.train_step = lambda mini, **kw: (seen.append(tuple(mini.advantages.shape)), step(mini, **kw))[1]
        runs.append(run)
        return run

    monkeypatch.setattr(train_module, "build_run", spy_build)
    train(cfg)
    assert runs[0].actor.ref_chunks is not None  # SPRO keeps the reference with kl_coef 0
    assert len(seen) == 2 and all(len(s) == 2 for s in seen)  # [B, T] token advantages
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    process = [r["train/adv_process_abs"] for r in rows if "train/adv_process_abs" in r]
    assert len(process) == 2
    # step 1: the policy is the reference, so the process reward is exactly 0; after one update
    # it is not, and the MSA moves the token advantages away from the outcome advantage
    assert process[0] == 0.0 and process[1] > 0.0
