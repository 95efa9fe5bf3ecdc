"""`spark-mcore train --config examples/configs/tiny_vl.yaml` under torchrun at TP2 (gloo):
policy AND reward steps run with the images in the model on both TP ranks.

The run reads shapes prompts from a JSONL file whose rows name PNG files on disk (the way a
user's data arrives), scored by a test verifier a random policy satisfies about half the time
(so GRPO's loss is not vacuous). Each rank records what reached it: the rows of every
`train_step` batch and how many carry processed images, every vision-tower call in the model's
embedding, and the prompts its transformers engine generated for (only TP rank 0 generates).
"""

from __future__ import annotations

import base64
import json
import sys
import textwrap
from pathlib import Path

import pytest

from spark_mcore.data.shapes import shapes_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_launch import launch_train, read_metrics, read_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # ~25 s of CPU for the two ranks (imports, model builds, 3 steps)

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_vl.yaml"
OVERRIDES = ["parallel.tp=2", "trainer.steps=2", "rollout.max_new_tokens=6", "eval.max_new_tokens=4",
             "logging.progress=false", "logging.tensorboard=false", "checkpoint.export_hf=false"]

RUNNER = textwrap.dedent("""
    import atexit, json, os, sys
    from spark_mcore.rewards import register_verifier

    @register_verifier("even_length")
    def even_length(response: str, answer: str) -> float:
        return float(len(str(response)) % 2 == 0)

    if __name__ == "__main__":  # megatron's checkpoint writer starts spawn-context processes
        from spark_mcore.models.qwen2_5_vl import Qwen2_5_VLGPTModel
        from spark_mcore.rollout.hf_engine import HFEngine
        from spark_mcore.trainer.actor import MegatronActor

        RECORD = {"train": [], "tower": [], "generate": []}
        train_step, embed, generate = MegatronActor.train_step, Qwen2_5_VLGPTModel.embed_inputs, HFEngine.generate

        def recording_train_step(self, batch, **kwargs):
            RECORD["train"].append({"kinds": sorted(set(batch.kinds)), "rows": batch.num_sequences,
                                    "image_rows": sum(i is not None for i in batch.images),
                                    "pads": [int((batch.tokens[r] == 513).sum()) for r in range(batch.num_sequences)]})
            return train_step(self, batch, **kwargs)

        def recording_embed(self, input_ids, images):
            if images is not None:
                RECORD["tower"].append({"images": int(images.image_grid_thw.shape[0]),
                                        "pads": int((input_ids == self.image_token_id).sum())})
            return embed(self, input_ids, images)

        def recording_generate(self, prompt_ids, params, images=None):
            RECORD["generate"].append({"prompts": len(prompt_ids),
                                       "with_images": sum(i is not None for i in (images or []))})
            return generate(self, prompt_ids, params, images=images)

        MegatronActor.train_step = recording_train_step
        Qwen2_5_VLGPTModel.embed_inputs = recording_embed
        HFEngine.generate = recording_generate
        atexit.register(lambda: open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ.get('RANK', '0')}.json"),
                                     "w").write(json.dumps(RECORD)))
        from spark_mcore.cli import main
        sys.exit(main(sys.argv[1:]))
""")


def _write_data(root: Path, split: str, size: int) -> Path:
    """shapes prompts as JSONL rows naming PNG files next to the file (relative paths)."""
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for p in shapes_problems(split, size, seed=3):
        png = root / "img" / f"{p.id}.png"
        png.write_bytes(base64.b64decode(p.images[0].split(",", 1)[1]))
        rows.append({"id": p.id, "prompt": p.messages[0]["content"], "answer": p.answer, "task": "even_length",
                     "images": [f"img/{png.name}"]})
    path = root / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("vl_tp2")
    train, held_out = _write_data(root, "train", 16), _write_data(root, "test", 2)
    (root / "runner.py").write_text(RUNNER)
    proc = launch_train(root / "runner.py", 2, [*OVERRIDES, f"data.source={train}", f"data.eval_source={held_out}",
                        f"checkpoint.dir={root / 'run'}"], record=root / "record", config=CONFIG, timeout=300)
    ranks, metrics = read_ranks(root / "record", 2), read_metrics(root / "run")
    return {"dir": root / "run", "stdout": proc.stdout, "ranks": ranks, "metrics": metrics}


def test_tiny_vl_at_tp2_runs_policy_and_reward_steps(tp2_run: dict) -> None:  # type: ignore[type-arg]
    out = tp2_run["stdout"]
    assert out.count("[policy step 1, policy 1/2]") == 1 and out.count("[reward step 2, policy 1/2]") == 1
    assert out.count("| model | held-out accuracy") == 1  # one writer
    assert (tp2_run["dir"] / "checkpoints" / "step_3").is_dir()
    policy, reward = tp2_run["metrics"][0], tp2_run["metrics"][1]
    assert 0 < policy["rollout/reward_mean"] < 1 and policy["train/grad_norm"] > 0  # a real update
    assert reward["rollout/responses"] > 0 and "rollout/reward_reflection" in reward
    assert "rollout/reward_pointwise" in reward or "rollout/reward_pairwise" in reward


def test_both_tp_ranks_train_reward_steps_on_image_rows(tp2_run: dict) -> None:  # type: ignore[type-arg]
    first, peer = tp2_run["ranks"]
    assert first["train"] == peer["train"]  # TP peers train on the same rows, images included
    steps = first["train"]
    assert len(steps) == 3  # policy, reward, policy
    reward = [s for s in steps if "policy" not in s["kinds"]]
    assert reward and set(reward[0]["kinds"]) <= {"pointwise", "pairwise", "reflection"}
    for step in steps:  # every row (policy, judge, reflection) carries its source's image
        assert step["image_rows"] == step["rows"] and all(n > 0 for n in step["pads"]), step
    for rank in (first, peer):  # the vision tower ran on both ranks, one image per row
        assert rank["tower"] and all(t["images"] > 0 and t["pads"] > 0 for t in rank["tower"])


def test_only_tp_rank_0_generates_and_its_engine_gets_the_images(tp2_run: dict) -> None:  # type: ignore[type-arg]
    first, peer = tp2_run["ranks"]
    assert peer["generate"] == []
    assert first["generate"] and all(g["with_images"] == g["prompts"] for g in first["generate"])
