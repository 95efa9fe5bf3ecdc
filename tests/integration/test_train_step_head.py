"""`spark-mcore train` with model.step_head=true: at TP2 under torchrun (gloo) it exits 0, logs
step_head/loss, acc and kept every policy step, and both TP ranks hold the same head after the
steps (and the export holds it too); at world size 1 a run resumed from its step-1 checkpoint
continues exactly (head metrics, head checkpoint and export bitwise); `spark-mcore eval
--best-of 2 --select step-head|judge` runs on the exported checkpoint.

Prompts are scored by a test verifier that a random policy satisfies about half the time, so
both step labels occur and the class weights are not degenerate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spark_mcore.cli import main
from spark_mcore.rewards import register_verifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_launch import launch_train, read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.step_head=true", "data.prompts_per_step=4", "rollout.n=4",
    "rollout.max_new_tokens=8", "warmstart.steps=2", "warmstart.batch_size=8", "trainer.steps=2",
    "trainer.micro_batch_size=8", "trainer.lr=0.001", "step_head.lr=0.01", "eval.max_new_tokens=8",
    "eval.limit=4", "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_interval=1",
    "checkpoint.keep_last=5",
]
HEAD_METRICS = ["step_head/loss", "step_head/acc", "step_head/kept"]

RUNNER = textwrap.dedent("""
    import atexit, os, sys
    from spark_mcore.rewards import register_verifier

    @register_verifier("even_length")
    def even_length(response: str, answer: str) -> float:
        return float(len(str(response)) % 2 == 0)

    if __name__ == "__main__":  # megatron's checkpoint writer starts spawn-context processes
        from spark_mcore.trainer.actor import MegatronActor

        ACTORS = []
        train_step = MegatronActor.train_step

        def recording_train_step(self, batch, **kwargs):
            if not ACTORS:
                ACTORS.append(self)
            return train_step(self, batch, **kwargs)

        def dump():
            if ACTORS and ACTORS[0].step_head is not None:
                from safetensors.torch import save_file
                state = {k: v.detach().contiguous().cpu() for k, v in ACTORS[0].step_head.head.state_dict().items()}
                save_file(state, os.path.join(os.environ["RECORD_DIR"], f"head_rank{os.environ.get('RANK', '0')}.safetensors"))

        MegatronActor.train_step = recording_train_step
        atexit.register(dump)
        from spark_mcore.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def _prepare(root: Path) -> Path:
    data = root / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Say something {i}", "answer": "7", "task": "even_length",
                                            "solution": f"One {i}. Two. \\boxed{{7}}"})
                                + "\n" for i in range(16)))
        (root / "runner.py").write_text(RUNNER)
    return data


def _train(root: Path, run_dir: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    data = _prepare(root)
    return launch_train(root / "runner.py", nproc, [*MICRO, f"data.source={data}", f"data.eval_source={data}",
                        f"checkpoint.dir={run_dir}", *extra], record=run_dir.parent / f"{run_dir.name}_record",
                        timeout=500)


def _metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in read_metrics(run_dir)}  # the last record per step wins


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("step_head")


@pytest.fixture(scope="module")
def ws1(root: Path) -> Path:
    run_dir = root / "ws1"
    _train(root, run_dir, 1)
    return run_dir


def test_tp2_trains_the_head_identically_on_both_ranks(root: Path) -> None:
    run_dir = root / "tp2"
    proc = _train(root, run_dir, 2, "parallel.tp=2")
    assert proc.stdout.count("| after RL |") == 1
    metrics = _metrics(run_dir)
    assert sorted(metrics) == [1, 2]
    for step, row in metrics.items():
        assert all(k in row for k in HEAD_METRICS), f"step {step}: {sorted(row)}"
        assert row["step_head/steps"] >= 16 and 0 <= row["step_head/acc"] <= 1  # >= 1 step per response
    assert any(metrics[s]["step_head/loss"] > 0 for s in metrics), "no head loss: the test would be vacuous"
    record = run_dir.parent / "tp2_record"
    heads = [load_file(str(record / f"head_rank{r}.safetensors")) for r in (0, 1)]
    assert sorted(heads[0]) == sorted(heads[1])
    for name in heads[0]:
        assert torch.equal(heads[0][name], heads[1][name]), name
    exported = load_file(str(run_dir / "hf" / "step_head.safetensors"))
    assert all(torch.equal(exported[k], heads[0][k]) for k in heads[0])
    assert (run_dir / "checkpoints" / "step_2" / "step_head.pt").is_file()


def test_ws1_resume_continues_the_head_exactly(root: Path, ws1: Path) -> None:
    resumed = root / "ws1_resumed"
    shutil.copytree(ws1, resumed, ignore=shutil.ignore_patterns("step_2", "hf", "eval_rl.json"))
    proc = _train(root, resumed, 1)
    assert "resumed from" in proc.stdout and "step_1" in proc.stdout
    full, again = _metrics(ws1), _metrics(resumed)
    keys = [*HEAD_METRICS, "train/pg_loss", "train/grad_norm"]
    assert [full[2].get(k) for k in keys] == [again[2].get(k) for k in keys]
    assert full[2]["step_head/loss"] > 0 or full[1]["step_head/loss"] > 0
    a = torch.load(ws1 / "checkpoints" / "step_2" / "step_head.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "step_2" / "step_head.pt", weights_only=True)
    assert int(a["steps"]) == int(b["steps"]) == 2
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    for k, v in a["optimizer"]["state"].items():  # AdamW moments continue from the checkpoint
        assert all(torch.equal(v[m], b["optimizer"]["state"][k][m]) for m in v)
    x, y = (load_file(str(d / "hf" / "step_head.safetensors")) for d in (ws1, resumed))
    assert all(torch.equal(x[k], y[k]) for k in x)


@register_verifier("step_head_even_length")  # in this process, for the in-process eval below
def _even_length(response: str, answer: str) -> float:
    return float(len(str(response)) % 2 == 0)


@pytest.mark.parametrize("select", ["step-head", "judge"])
def test_eval_best_of_on_the_export(root: Path, ws1: Path, select: str, capsys: pytest.CaptureFixture) -> None:
    data, out = root / "eval.jsonl", root / f"best_of_{select}.json"
    data.write_text("".join(json.dumps({"prompt": f"Say something {i}", "answer": "7",
                                        "task": "step_head_even_length"}) + "\n" for i in range(4)))
    rc = main(["eval", "--checkpoint", str(ws1), "--data", str(data), "--split", "train", "--best-of", "2",
               "--select", select, "--limit", "3", "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["best_of"]
    assert res["select"] == select and res["n"] == 2 and res["num_prompts"] == 3
    assert res["avg_at_n"] <= res["pass_at_n"] and res["selected_accuracy"] <= res["pass_at_n"]
    assert f"| {select} |" in capsys.readouterr().out
