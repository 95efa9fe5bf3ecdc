"""SPARK's tasks built from image prompts carry their source's images all the way: recycled
pointwise / pairwise / reflection prompts (through the reward cache and its checkpoint state)
reach the engine with the source's processed pixels and the GRPO batch with the source's
pixel_values and image_grid_thw; test-time self-reflection judges and revises with the image."""

from __future__ import annotations

import pytest
import torch

from spark_mcore.data.images import VisionProcessing
from spark_mcore.data.shapes import shapes_problems
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.data.vision_prompts import VisionPromptEncoder, add_vision_tokens
from spark_mcore.eval.self_reflect import self_reflect
from spark_mcore.models.vision import VisionInputs
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.groups import generate_groups
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.loop import SparkState
from spark_mcore.spark.schedule import StepPlan
from spark_mcore.trainer.batching import groups_to_batch
from spark_mcore.types import KIND_KEY, Completion, Prompt, Rollout, RolloutGroup


class ImageRecordingEngine:
    """Answers every prompt with fixed texts; records the images each prompt arrived with."""

    takes_images = True
    policy_version = 0

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.seen = texts, []  # seen: (prompt ids, VisionInputs | None) per prompt

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 images: list[VisionInputs | None] | None = None) -> list[list[Completion]]:
        self.seen += list(zip(prompt_ids, images or [None] * len(prompt_ids), strict=True))
        return [[Completion(token_ids=[5, 6], text=self.texts[i % len(self.texts)], logprobs=[-1.0, -1.0])
                 for i in range(params.n)] for _ in prompt_ids]


PAD = 513  # <|image_pad|>: the built-in tokenizer's 512 ids + the vision tokens


@pytest.fixture(scope="module")
def encoder() -> VisionPromptEncoder:
    tok = build_tokenizer()
    assert add_vision_tokens(tok)["<|image_pad|>"] == PAD
    processing = VisionProcessing(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  min_pixels=16 * 16, max_pixels=32 * 32)
    return VisionPromptEncoder(tok, processing)


def _group(prompt: Prompt, encode: VisionPromptEncoder, right: list[bool]) -> RolloutGroup:
    texts = [f"the answer is \\boxed{{{prompt.answer if ok else 'nine hundred'}}}" for ok in right]
    return RolloutGroup(prompt, [Rollout(prompt, encode(prompt), Completion([5, 6], t, [-1.0, -1.0]), reward=float(ok))
                                 for t, ok in zip(texts, right, strict=True)])


def test_recycled_tasks_carry_their_source_image_to_the_engine_and_the_batch(encoder: VisionPromptEncoder) -> None:
    sources = shapes_problems("train", 3, seed=11)  # three different images
    groups = [_group(sources[0], encoder, [True, True]),     # all right: pointwise "Yes"
              _group(sources[1], encoder, [False, False]),   # all wrong: pointwise "No" + reflection
              _group(sources[2], encoder, [True, False])]    # mixed: pairwise + reflection
    spark = SparkState(SparkConfig(enabled=True, judge_per_prompt=1.0, reflection_per_prompt=1.0,
                                   pointwise_prob_mixed=0.0, reward_batch_size=5), prompts_per_step=3)
    spark.after_step(StepPlan(kind="policy"), groups, step=0)
    restored = SparkState(spark.cfg, prompts_per_step=3)  # the cache as a resumed run has it
    restored.load_state_dict(spark.state_dict())
    _, tasks = restored.plan()
    assert sorted(p.meta[KIND_KEY] for p in tasks) == ["pairwise", "pointwise", "pointwise", "reflection",
                                                       "reflection"]
    by_id = {p.id: p for p in sources}
    source_of = {t.id: by_id[t.id.split("@")[0]] for t in tasks}
    for task in tasks:
        assert task.images == source_of[task.id].images  # the same image references

    engine = ImageRecordingEngine(["\\boxed{Yes}", "\\boxed{A}"])
    rolled = generate_groups(engine, tasks, encoder, SamplingParams(n=2, temperature=1.0, max_new_tokens=4))
    for (ids, vision), task in zip(engine.seen, tasks, strict=True):
        pixels, grid = encoder.images(source_of[task.id])
        assert vision is not None and torch.equal(vision.pixel_values, pixels) and torch.equal(vision.image_grid_thw, grid)
        assert ids.count(PAD) == int(grid.prod(-1).sum()) // 4

    for i, g in enumerate(rolled):  # rewards differ within each group: nothing is filtered
        g.rollouts[0].reward, g.rollouts[1].reward = float(i % 2), float(1 - i % 2)
    batch, _ = groups_to_batch(rolled, 1e-6, True, True, images_of=encoder.images)
    assert batch is not None and batch.num_sequences == 2 * len(tasks) and len(batch.images) == batch.num_sequences
    rows = [r for g in rolled for r in g.rollouts]
    for row, (images, rollout) in enumerate(zip(batch.images, rows, strict=True)):
        pixels, grid = encoder.images(source_of[rollout.prompt.id])
        assert images is not None and torch.equal(images[0], pixels) and torch.equal(images[1], grid)
        assert batch.kinds[row] == rollout.prompt.meta[KIND_KEY]


def test_self_reflection_judges_and_revises_with_the_image(encoder: VisionPromptEncoder) -> None:
    prompts = shapes_problems("test", 2, seed=11)
    engine = ImageRecordingEngine(["\\boxed{No}"])  # every answer is rejected: judge, revise, judge, revise
    result = self_reflect(engine, encoder, prompts, rounds=2, params=SamplingParams(max_new_tokens=4))
    assert result.rounds_used == [2, 2]
    assert len(engine.seen) == 2 + 2 * 2 * 2  # solve + (judge + revise) x 2 rounds, per prompt
    expected = {str(p.images): encoder.images(p) for p in prompts}
    seen_pixels = [v.pixel_values for _, v in engine.seen]
    for pixels in seen_pixels:
        assert any(torch.equal(pixels, e[0]) for e in expected.values())
    for p in prompts:  # each source's image is used for its own solve, judges and revisions
        assert sum(torch.equal(px, expected[str(p.images)][0]) for px in seen_pixels) == 5
