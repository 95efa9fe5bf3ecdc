"""The CPU twin server takes SGLang's `image_data` for a vision-language model: the images are
processed with the model directory's preprocessor_config.json (which spark-mcore's HF export
writes) and generation equals the transformers engine's with the same processed images; bad
image input answers a 400 naming the field and the fix."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import torch

from spark_mcore.data.images import (
    PROCESSOR_CONFIG,
    PilDecoder,
    VisionProcessing,
    image_bytes,
    process_images,
    processing_from_dir,
    processor_config,
)
from spark_mcore.data.shapes import shapes_problems
from spark_mcore.models.vision import VisionInputs
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.sglang_engine import SGLangEngine
from spark_mcore.twin.app import RequestError
from spark_mcore.twin.server import build_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vl_tiny import IMAGE, MERGE, PATCH, TPATCH, VEND, VSTART, tiny_hf_model, tiny_vl_config  # noqa: E402

PROCESSING = VisionProcessing(PATCH, MERGE, TPATCH, min_pixels=16 * 16, max_pixels=32 * 32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model_dir = tmp_path_factory.mktemp("twin_vl")
    tiny_hf_model(tiny_vl_config(), seed=4).save_pretrained(model_dir)
    (model_dir / PROCESSOR_CONFIG).write_text(json.dumps(processor_config(PROCESSING)))
    uri = shapes_problems("train", 1, seed=8)[0].images[0]
    png = model_dir / "shape.png"
    png.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    processed = process_images(PilDecoder().decode([uri]), PROCESSING)
    ids = [1, 2, VSTART] + [IMAGE] * sum(processed.tokens_per_image(MERGE)) + [VEND, 3, 4]
    return build_app(str(model_dir)), model_dir, uri, png, processed, ids


def test_export_config_round_trips_and_transformers_reads_it(served: tuple) -> None:
    from transformers import Qwen2VLImageProcessor

    _, model_dir, uri, _, processed, _ = served
    assert processing_from_dir(model_dir) == PROCESSING
    hf = Qwen2VLImageProcessor.from_pretrained(model_dir)(images=PilDecoder().decode([uri]), return_tensors="pt")
    assert torch.equal(hf["image_grid_thw"], processed.image_grid_thw)  # a server processes as we do


def test_image_data_generates_what_the_engine_generates_with_the_images(served: tuple) -> None:
    app, _, uri, png, processed, ids = served
    sp = {"max_new_tokens": 5, "temperature": 1.0, "sampling_seed": 17}
    expected = app.engine.generate([ids], SamplingParams(n=1, max_new_tokens=5, seed=17),
                                   images=[VisionInputs(processed.pixel_values, processed.image_grid_thw)])[0][0]
    for image_data in ([uri], uri, [str(png)]):  # one request: a list of references or one reference
        status, out = app.generate({"input_ids": ids, "image_data": image_data, "sampling_params": sp})
        assert status == 200 and out["output_ids"] == expected.token_ids
    status, out = app.generate({"input_ids": [ids, [1, 2, 3]], "image_data": [[uri], None],
                                "sampling_params": [sp, sp]})  # a batch: one entry per request
    assert status == 200 and out[0]["output_ids"] == expected.token_ids
    with pytest.raises(RequestError, match="image_data: missing, but input_ids hold image pads"):
        app.generate({"input_ids": ids, "sampling_params": sp})
    without = app.engine.generate([ids], SamplingParams(n=1, max_new_tokens=5, seed=17))[0][0]
    assert without.token_ids != expected.token_ids  # the image changes what is generated


def test_sglang_engine_sends_local_files_as_data_uris(served: tuple) -> None:
    _, _, uri, png, _, ids = served
    sent = []
    engine = SGLangEngine.__new__(SGLangEngine)
    engine.client = type("Client", (), {"generate": lambda self, p, params, data: sent.append(data) or []})()
    engine.generate([ids], SamplingParams(), image_data=[[str(png)]])
    (((ref,),),) = sent
    assert ref.startswith("data:") and image_bytes(ref) == png.read_bytes()  # the file's bytes, as a data URI
    engine.generate([ids], SamplingParams(), image_data=[[uri]])
    assert sent[1] == [[uri]] and SGLangEngine.takes_image_refs  # data URIs (and URLs) travel as they are


@pytest.mark.parametrize(("body", "match"), [
    ({"image_data": ["/no/such.png"]}, r"image_data\[0\]: no image file at '/no/such.png'"),
    ({"input_ids": [[1, 2], [3]], "image_data": [["a.png"]]}, r"one entry per request \(2\)"),
    ({"image_data": [3]}, r"image_data\[0\]: expected image references"),
])
def test_bad_image_data_is_refused_naming_the_field(served: tuple, body: dict, match: str) -> None:
    app, _, _, _, _, ids = served
    with pytest.raises(RequestError, match=match):
        app.generate({"input_ids": ids, **body})  # body's input_ids replace the prompt's


def test_pad_count_must_match_the_processed_images(served: tuple) -> None:
    app, _, uri, _, _, ids = served
    with pytest.raises(RequestError, match="image pads but the images give .*data.image_min/max_pixels"):
        app.generate({"input_ids": ids[:4] + ids[5:], "image_data": [uri]})  # one pad short


def test_vl_model_without_processor_config_is_refused(served: tuple, tmp_path: Path) -> None:
    _, model_dir, *_ = served
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (model_dir / name).is_file():
            (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(SystemExit, match="preprocessor_config.json.*Fix: export the model with spark-mcore"):
        build_app(str(tmp_path))
