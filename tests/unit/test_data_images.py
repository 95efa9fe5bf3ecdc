"""Image rows: decoding and validation at load (missing, truncated, non-image files), bytes and
data URIs, DALI requested but absent, Qwen2.5-VL preprocessing, image rows in a run that cannot
use them, and the builtin `shapes` task."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.config import DataConfig
from spark_mcore.data.dataset import load_prompts
from spark_mcore.data.images import (
    DALI_INSTALL,
    ImageError,
    PilDecoder,
    VisionProcessing,
    bytes_to_data_uri,
    check_prompt_images,
    expand_image_pads,
    process_images,
)
from spark_mcore.data.jsonl import DatasetError, load_prompt_file, parse_row
from spark_mcore.data.shapes import MAKERS, shapes_problems


def _png(size: tuple[int, int] = (20, 12), colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Rows 1-4: good, missing file, truncated PNG, a text file named .png; row 5 good."""
    (tmp_path / "good.png").write_bytes(_png())
    (tmp_path / "cut.png").write_bytes(_png((64, 64))[:60])
    (tmp_path / "notes.png").write_text("not an image at all\n")
    images = ["good.png", "gone.png", "cut.png", "notes.png", "good.png"]
    rows = [{"prompt": f"q{i}", "answer": "1", "images": [img]} for i, img in enumerate(images)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check(ref: str) -> None:
    PilDecoder().decode([ref])


@pytest.mark.parametrize("line, path, problem", [
    (2, "gone.png", "no file at"),
    (3, "cut.png", "damaged or truncated"),
    (4, "notes.png", "not an image file"),
])
def test_bad_image_row_is_reported_with_row_and_path(dataset: Path, line: int, path: str,
                                                     problem: str) -> None:
    lines = dataset.read_text().splitlines()
    one = dataset.parent / f"one_{line}.jsonl"
    one.write_text(lines[0] + "\n" + lines[line - 1] + "\n")
    with pytest.raises(DatasetError) as e:
        load_prompt_file(one, on_bad_row="error", image_check=_check)
    msg = str(e.value)
    assert msg.startswith(f"{one}:2: field 'images[0]': ") and path in msg and problem in msg
    assert "Fix: " in msg


def test_bad_images_are_skipped_with_on_bad_row_skip(dataset: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    prompts = load_prompt_file(dataset, on_bad_row="skip", image_check=_check)
    assert [p.messages[0]["content"] for p in prompts] == ["q0", "q4"]
    assert "skipped 3 bad rows of 5" in caplog.text
    assert all(re.search(name, caplog.text) for name in ("gone.png", "cut.png", "notes.png"))


def test_load_prompts_checks_images_with_the_configured_decoder(dataset: Path) -> None:
    cfg = DataConfig(source=str(dataset), on_bad_row="skip")
    assert len(load_prompts(cfg, "train")) == 2


def test_bytes_and_data_uris() -> None:
    raw = _png()
    for entry in (raw, {"bytes": raw, "path": None}, bytes_to_data_uri(raw, "image/png")):
        p = parse_row({"prompt": "q", "answer": "1", "images": [entry]}, "x", Path("."))
        (img,) = PilDecoder().decode(p.images)
        assert img.size == (20, 12) and img.getpixel((0, 0)) == (200, 10, 10)
    with pytest.raises(ImageError, match="not an image"):
        PilDecoder().decode([bytes_to_data_uri(b"hello")])


def test_dali_requested_but_absent_fails_at_config_time() -> None:
    try:
        import nvidia.dali  # noqa: F401
        pytest.skip("NVIDIA DALI is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError) as e:
        DataConfig(image_decoder="dali")
    assert "data.image_decoder=dali" in str(e.value) and DALI_INSTALL in str(e.value)


def test_image_row_in_a_text_only_run_is_a_clear_error() -> None:
    (p,) = shapes_problems("train", 1)
    with pytest.raises(ConfigError, match="model.family='qwen2' is text-only.*qwen2_5_vl"):
        check_prompt_images([p], "qwen2", multimodal=False)
    check_prompt_images([], "qwen2", multimodal=False)


def test_processing_gives_patches_grids_and_pads() -> None:
    cfg = VisionProcessing(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64,
                           max_pixels=32 * 32)
    imgs = [Image.new("RGB", (40, 24), (9, 9, 9)), Image.new("RGB", (200, 200), (1, 2, 3))]
    out = process_images(imgs, cfg)
    thw = out.image_grid_thw
    assert thw[:, 0].tolist() == [1, 1] and (thw[:, 1:] % 2 == 0).all()
    assert int(thw[1, 1] * thw[1, 2]) * 16 <= 32 * 32  # the large image is scaled down
    assert out.pixel_values.shape == (int(thw.prod(-1).sum()), 3 * 2 * 4 * 4)
    counts = out.tokens_per_image(2)
    ids = expand_image_pads([5, 7, 9, 7, 5], pad_id=7, counts=counts)
    assert ids == [5] + [7] * counts[0] + [9] + [7] * counts[1] + [5]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        expand_image_pads([7, 7], 7, [4])
    with pytest.raises(ConfigError, match="image_min_pixels"):
        VisionProcessing(patch_size=14, merge_size=2, min_pixels=100, max_pixels=1000)


def test_shapes_is_deterministic_disjoint_and_correct() -> None:
    train = shapes_problems("train", 60, seed=3)
    again = shapes_problems("train", 60, seed=3)
    test = shapes_problems("test", 30, seed=3)
    assert [(p.images, p.answer) for p in train] == [(p.images, p.answer) for p in again]
    assert {p.meta["kind"] for p in train} == set(MAKERS)
    assert not {p.meta["split_key"] for p in train} & {p.meta["split_key"] for p in test}
    for p in train + test:
        (img,) = PilDecoder().decode(p.images)
        assert img.size == (96, 96) and p.task == "math" and "\\boxed{}" in p.messages[0]["content"]
        if p.meta["kind"] == "sum":
            _, a, b = eval(p.meta["split_key"])  # noqa: S307  (our own repr of ints)
            assert int(p.answer) == a + b
        if p.meta["kind"] == "compare":
            radii = eval(p.meta["split_key"])[3]  # noqa: S307
            assert p.answer == ("1" if radii[0] > radii[1] else "2")
    assert shapes_problems("train", 5, seed=4)[0].images != train[0].images


def test_shapes_count_answer_matches_the_pixels() -> None:
    """The counted colour's shapes are really drawn: the answer is 0 iff no pixel has it."""
    from spark_mcore.data.shapes import COLOURS

    for p in [q for q in shapes_problems("train", 30, seed=1) if q.meta["kind"] == "count"]:
        colour = eval(p.meta["split_key"])[1]  # noqa: S307
        (img,) = PilDecoder().decode(p.images)
        has = any(px == COLOURS[colour] for px in img.getdata())
        assert has == (p.answer != "0")


def test_builtin_shapes_source() -> None:
    cfg = DataConfig(source="builtin:shapes", train_size=6, test_size=3)
    assert len(load_prompts(cfg, "train")) == 6 and len(load_prompts(cfg, "test")) == 3
    assert torch.is_tensor(process_images(PilDecoder().decode(load_prompts(cfg, "test")[0].images),
                                          VisionProcessing(patch_size=4, min_pixels=64,
                                                           max_pixels=4096)).pixel_values)
