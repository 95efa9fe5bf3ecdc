"""A rollout worker of a vision-language run encodes prompts as the trainer does (expanded
image pads, the tokenizer's vision tokens checked against model.vision) and hands the engine
the prompts' images; an engine that takes none is refused naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.data.shapes import shapes_problems
from spark_mcore.data.vision_prompts import VisionPromptEncoder
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.groups import generate_groups
from spark_mcore.rollout_worker import _Generator

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_vl.yaml"


def test_worker_encodes_vl_prompts_like_the_trainer(tmp_path: Path) -> None:
    cfg = load_run_config(str(CONFIG), ["rollout.engine=scripted", f"checkpoint.dir={tmp_path}"])
    gen = _Generator(cfg, "w0")
    assert isinstance(gen.encode, VisionPromptEncoder)
    (prompt,) = shapes_problems("train", 1, seed=4)
    pixels, grid = gen.encode.images(prompt)
    ids = gen.encode(prompt)
    assert ids.count(cfg.model.vision.image_token_id) == int(grid.prod(-1).sum()) // 4 > 0
    with pytest.raises(ConfigError, match="ScriptedEngine does not take images.*rollout.engine: hf"):
        generate_groups(gen.engine, [prompt], gen.encode, SamplingParams())
    gen.pool.close()
