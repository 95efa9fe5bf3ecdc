"""Vision-language rows through the trainer at world size 1: a shapes prompt and the SPARK
judge / reflection prompts recycled from it carry the image into the TrainBatch, and the
actor's log-probs on that batch (images in the forward) equal transformers' (fp32, 1e-5)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import spark_mcore.config  # noqa: F401  (before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.config.loader import ConfigError
from spark_mcore.data.images import IMAGE_PLACEHOLDER, VisionProcessing, encode_vl_prompt
from spark_mcore.data.shapes import shapes_problems
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.data.vision_prompts import VisionPromptEncoder, add_vision_tokens, check_token_ids
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.groups import generate_groups
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.recycler import Recycler
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.batching import rollouts_to_batch
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.types import Completion, Rollout, RolloutGroup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_tiny import MERGE, PATCH, TPATCH, tiny_hf_model, tiny_vl_config  # noqa: E402

VL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def pstate() -> Iterator[object]:
    state = init_distributed(ParallelConfig(), seed=7)
    yield state
    destroy_distributed()


@pytest.fixture(scope="module")
def setup() -> dict:
    tok = build_tokenizer()
    ids = add_vision_tokens(tok)
    start, pad, end, video = (ids[t] for t in VL_TOKENS)
    assert (start, pad, end, video) == (512, 513, 514, 515)  # what examples/configs/tiny_vl.yaml sets
    vocab = len(tok) + (-len(tok) % 8)
    cfg = tiny_vl_config(vocab_size=vocab)
    cfg.vision.image_token_id, cfg.vision.video_token_id = pad, video
    cfg.vision.vision_start_token_id, cfg.vision.vision_end_token_id = start, end
    processing = VisionProcessing(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TPATCH,
                                  min_pixels=16 * 16, max_pixels=24 * 24)
    return {"tok": tok, "cfg": cfg, "vocab": vocab, "processing": processing}


@pytest.fixture(scope="module")
def rolled(setup: dict) -> tuple[list[Rollout], dict]:
    """A shapes group (one right, one wrong answer) and what SPARK recycles from it."""
    tok, processing = setup["tok"], setup["processing"]
    (prompt,) = shapes_problems("train", 1, seed=2)
    texts = [f"\\boxed{{{prompt.answer}}}", "\\boxed{99}"]
    group = RolloutGroup(prompt, [Rollout(prompt, [], Completion(tok.encode(t), t), reward=float(i == 0))
                                  for i, t in enumerate(texts)])
    samples = Recycler(SparkConfig(enabled=True, judge_per_prompt=1.0,
                                   reflection_per_prompt=1.0)).recycle([group], step=0)
    assert {s.kind for s in samples} >= {"reflection"} and len(samples) >= 2
    encoder = VisionPromptEncoder(tok, processing)
    cache: dict = {}
    rollouts = []
    for p in [prompt] + [s.prompt for s in samples]:
        ids, images = encode_vl_prompt(tok, p, processing)
        assert encoder(p) == ids and torch.equal(encoder.images(p)[0], images.pixel_values)
        cache[p.id] = encoder.images(p)
        reply = tok.encode(" \\boxed{Yes}") + [tok.eos_token_id]
        rollouts.append(Rollout(p, ids, Completion(reply, "")))
    assert len(encoder._cache) == 1  # recycled prompts reuse the source's processed image
    return rollouts, cache


def test_judge_and_reflection_rows_carry_their_images_into_the_batch(setup: dict, rolled: tuple) -> None:
    rollouts, cache = rolled
    batch = rollouts_to_batch(rollouts, torch.zeros(len(rollouts)), images_of=lambda p: cache[p.id])
    assert len(batch.images) == len(rollouts)
    kinds = batch.kinds
    assert kinds[0] == "policy" and set(kinds[1:]) <= {"pointwise", "pairwise", "reflection"}
    source_pixels = batch.images[0][0]
    for row, images in enumerate(batch.images):
        assert images is not None and torch.equal(images[0], source_pixels)
        pads = int((batch.tokens[row] == setup["cfg"].vision.image_token_id).sum())
        assert pads == int(images[1].prod(-1).sum()) // MERGE**2
    assert rollouts[1].prompt.images == rollouts[0].prompt.images
    assert IMAGE_PLACEHOLDER not in rollouts[1].prompt.messages[0]["content"]  # added at encoding


def test_actor_logprobs_with_images_match_transformers(pstate: object, setup: dict, rolled: tuple) -> None:
    cfg, vocab = setup["cfg"], setup["vocab"]
    rollouts, cache = rolled
    batch = rollouts_to_batch(rollouts, torch.zeros(len(rollouts)), images_of=lambda p: cache[p.id])
    actor = MegatronActor(cfg, TrainerConfig(micro_batch_size=2), AlgoConfig(), pstate, vocab)
    hf = tiny_hf_model(cfg, seed=5)
    actor.adapter.load_hf_state(actor.unwrapped, hf.state_dict())
    got = actor.compute_logprobs(batch)
    for row, r in enumerate(rollouts):
        ids = torch.tensor([r.prompt_ids + r.completion.token_ids])
        pv, thw = cache[r.prompt.id]
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=pv, image_grid_thw=thw,
                        mm_token_type_ids=(ids == cfg.vision.image_token_id).int()).logits
        ref = torch.log_softmax(logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        n = ids.shape[1]
        mask = batch.loss_mask[row, 1:n]
        assert mask.sum() > 0
        assert ((got[row, 1:n] - ref) * mask).abs().max().item() <= 1e-5


def test_packed_rows_with_images_are_refused(pstate: object, setup: dict, rolled: tuple) -> None:
    cfg, vocab = setup["cfg"], setup["vocab"]
    rollouts, cache = rolled
    batch = rollouts_to_batch(rollouts[:1], torch.zeros(1), images_of=lambda p: cache[p.id])
    actor = MegatronActor(cfg, TrainerConfig(pack_sequences=True), AlgoConfig(), pstate, vocab)
    with pytest.raises(ConfigError, match="pack_sequences"):
        actor.compute_logprobs(batch)


@pytest.mark.parametrize("frozen", [False, True])
def test_train_step_with_images_moves_the_tower_unless_frozen(pstate: object, setup: dict,
                                                              rolled: tuple, frozen: bool) -> None:
    cfg = dataclasses.replace(setup["cfg"], freeze_vision=frozen)
    rollouts, cache = rolled
    batch = rollouts_to_batch(rollouts, torch.linspace(-1.0, 1.0, len(rollouts)),
                              images_of=lambda p: cache[p.id])
    actor = MegatronActor(cfg, TrainerConfig(micro_batch_size=2, lr=1e-2, warmup_ratio=0.0),
                          AlgoConfig(kl_coef=0.0), pstate, setup["vocab"])
    actor.setup_optimizer(1e-2, 1, 0)
    batch.old_logprobs = actor.compute_logprobs(batch)
    tower = {n: p.detach().clone() for n, p in actor.unwrapped.vision_model.named_parameters()}
    actor.train_step(batch)
    moved = [n for n, p in actor.unwrapped.vision_model.named_parameters() if not torch.equal(p, tower[n])]
    assert (not moved) if frozen else len(moved) == len(tower)


def test_token_ids_must_match_the_tokenizer(setup: dict) -> None:
    ids = add_vision_tokens(build_tokenizer())
    check_token_ids(ids, setup["cfg"].vision)
    wrong = dataclasses.replace(setup["cfg"].vision, image_token_id=7)
    with pytest.raises(ConfigError, match="model.vision.image_token_id=513"):
        check_token_ids(ids, wrong)


def test_an_engine_without_images_is_refused(setup: dict) -> None:
    class TextOnly:
        policy_version = 0

        def generate(self, prompt_ids: list, params: SamplingParams) -> list:
            raise AssertionError("must not be called")

    encoder = VisionPromptEncoder(setup["tok"], setup["processing"])
    with pytest.raises(ConfigError, match="does not take images"):
        generate_groups(TextOnly(), shapes_problems("test", 1), encoder, SamplingParams())  # type: ignore[arg-type]
