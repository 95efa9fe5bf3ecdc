"""`spark-mcore train` with Prefix-RFT (rollout.prefix.enabled=true) on the tiny config, at world
size 1 and under torchrun at TP2 (gloo): each run exits 0 and logs the prefix metrics; demonstration
prefixes come from the dataset rows' "solution" field; TP2 (vocab-parallel entropy for the keep
mask) samples the same responses and logs the same metrics as world size 1."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from spark_mcore.data.arith import arith_problems, worked_solution

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_launch import launch_train, read_metrics, read_ranks  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "data.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=16",
    "warmstart.steps=2", "warmstart.batch_size=8", "trainer.steps=2", "trainer.micro_batch_size=4",
    "trainer.lr=0.001", "trainer.warmup_ratio=0", "eval.max_new_tokens=8", "eval.samples=0",
    "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false",
    "rollout.prefix.enabled=true", "rollout.prefix.members=2",
]
PREFIX_METRICS = ["rollout/prefix_responses", "rollout/prefix_tokens", "rollout/prefix_frac_high",
                  "rollout/prefix_accuracy", "rollout/onpolicy_accuracy", "train/prefix_token_frac",
                  "train/prefix_kept_frac", "train/prefix_entropy"]
COMPARED = ["rollout/reward_mean", "train/pg_loss", "train/kl", "train/entropy", "train/grad_norm",
            "train/prefix_token_frac", "train/prefix_kept_frac", "train/prefix_entropy"]

RUNNER = textwrap.dedent("""
    import atexit, json, os, sys
    from spark_mcore.rewards import register_verifier

    @register_verifier("even_length")
    def even_length(response: str, answer: str) -> float:
        return float(len(str(response)) % 2 == 0)

    if __name__ == "__main__":  # megatron's checkpoint writer starts spawn-context processes
        import spark_mcore.train as train_mod

        responses, update = [], train_mod.update

        def recording_update(run, groups, version, *args, **kwargs):
            responses.append([[(r.completion.token_ids, r.completion.prefix_len) for r in g.rollouts] for g in groups])
            return update(run, groups, version, *args, **kwargs)

        train_mod.update = recording_update
        atexit.register(lambda: open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ.get('RANK', '0')}.json"),
                                     "w").write(json.dumps(responses)))
        from spark_mcore.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def _launch(root: Path, name: str, nproc: int, overrides: list[str]) -> dict[str, object]:
    run_dir, record, data = root / name, root / f"{name}_record", root / "data.jsonl"
    proc = launch_train(root / "runner.py", nproc, [*MICRO, *overrides, f"data.source={data}",
                        f"data.eval_source={data}", f"checkpoint.dir={run_dir}"], record=record,
                        config=ROOT / "examples/configs/tiny_cpu.yaml")
    return {"stdout": proc.stdout, "metrics": read_metrics(run_dir), "responses": read_ranks(record, nproc)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    root = tmp_path_factory.mktemp("prefix")
    rows = [{"prompt": p.messages[0]["content"], "answer": p.answer, "task": "even_length", "id": p.id,
             "solution": worked_solution(p)} for p in arith_problems([1], "train", 16, seed=5)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "runner.py").write_text(RUNNER)
    return {"ws1": _launch(root, "ws1", 1, []), "tp2": _launch(root, "tp2", 2, ["parallel.tp=2"])}


@pytest.mark.parametrize("name", ["ws1", "tp2"])
def test_prefix_run_exits_zero_with_prefix_metrics(runs: dict, name: str) -> None:  # type: ignore[type-arg]
    run = runs[name]
    assert run["stdout"].count("[policy step 2, policy 2/2]") == 1
    assert len(run["metrics"]) == 2
    for step in run["metrics"]:
        missing = [k for k in PREFIX_METRICS if k not in step]
        assert not missing, (name, missing)
        # members 0 and 1 of each of the 4 prompts continue a prefix of the row's solution (one
        # whose drawn fraction floors to 0 tokens is on-policy)
        assert 4 <= step["rollout/prefix_responses"] <= 8 and step["rollout/prefix_tokens"] > 0
        assert 0 < step["train/prefix_token_frac"] < 1
        assert 0.2 <= step["train/prefix_kept_frac"] < 0.3  # ceil(0.2 n) of n prefix tokens
    first, second = run["metrics"]
    assert first["rollout/prefix_frac_high"] == pytest.approx(0.95)
    assert second["rollout/prefix_frac_high"] == pytest.approx(0.5)  # cosine decay over 2 steps
    for groups in run["responses"][0]:
        assert all(g[2][1] == g[3][1] == 0 for g in groups) and any(g[0][1] > 0 for g in groups)


def test_tp2_equals_world_size_one(runs: dict) -> None:  # type: ignore[type-arg]
    ws1, tp2 = runs["ws1"], runs["tp2"]
    for rank in tp2["responses"]:
        assert rank == ws1["responses"][0]  # the same responses and prefixes, token for token
    assert 0 < ws1["metrics"][0]["rollout/reward_mean"] < 1
    assert abs(ws1["metrics"][0]["train/pg_loss"]) + ws1["metrics"][0]["train/grad_norm"] > 0
    for mine, theirs in zip(tp2["metrics"], ws1["metrics"], strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (mine["step"], key)
