"""Images of vision-language prompts: decoding (PIL or NVIDIA DALI), validation at load time,
and the Qwen2.5-VL preprocessing (pixel patches, grids, image-pad tokens).

An image reference (`Prompt.images[i]`) is a file path, a `data:` URI (base64 bytes: what
rows with raw image bytes and the builtin `shapes` task carry) or a URL (kept as is; only the
engine may fetch it). Every referenced file is decoded once when the dataset loads, so a
missing, truncated or non-image file is reported with its row and path and handled by
`data.on_bad_row` there, never mid-run.

Preprocessing follows transformers' Qwen2-VL image processor: each image is resized to a
multiple of patch * merge pixels with min_pixels <= h*w <= max_pixels, cut into
temporal_patch x patch x patch patches (the frame repeated along time), giving
pixel_values [P, C * temporal_patch * patch * patch] and image_grid_thw [N, 3]; the prompt's
single `<|image_pad|>` per image becomes t*h*w / merge^2 of them (one per merged patch).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from spark_mcore.config.loader import ConfigError

DATA_URI = re.compile(r"^data:([\w.+/-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)
_REMOTE = ("http://", "https://", "s3://", "gs://")
DALI_INSTALL = ("pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120 "
                "(or nvidia-dali-cuda110 for CUDA 11)")


class ImageError(ValueError):
    """An image cannot be read or decoded; the message names the image and what is wrong."""


def bytes_to_data_uri(data: bytes, mime: str = "image") -> str:
    """Raw image bytes (a Parquet binary column, HF datasets' {"bytes": ...}) -> a data URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def describe(ref: str) -> str:
    """A short printable name of an image reference (data URIs are long)."""
    return f"{ref[:40]}... ({len(ref)} chars)" if DATA_URI.match(ref) else ref


def image_bytes(ref: str) -> bytes:
    """The encoded bytes of a path or data URI; ImageError for a URL or an unreadable file."""
    match = DATA_URI.match(ref)
    if match:
        try:
            return base64.b64decode(ref[match.end():], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"data URI {describe(ref)}: invalid base64 ({e})") from e
    if ref.startswith(_REMOTE):
        raise ImageError(f"{ref}: remote images are not fetched by the trainer; download it "
                         "and use a file path")
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    if not path.is_file():
        raise ImageError(f"no image file at '{path}'")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"'{path}' cannot be read ({e.strerror})") from e


class ImageDecoder(Protocol):
    """Decodes encoded images to PIL RGB images (what the processor takes)."""

    name: str

    def decode(self, refs: Sequence[str]) -> list[Any]: ...


class PilDecoder:
    """Pillow, on the CPU. A truncated or non-image file raises ImageError naming it."""

    name = "pil"

    def decode(self, refs: Sequence[str]) -> list[Any]:
        from PIL import Image, UnidentifiedImageError

        out = []
        for ref in refs:
            data = image_bytes(ref)
            try:
                img = Image.open(io.BytesIO(data))
                img.load()  # full decode: a truncated file fails here, not in a training step
            except UnidentifiedImageError as e:
                raise ImageError(f"{describe(ref)} is not an image file PIL can read") from e
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"{describe(ref)} is damaged or truncated ({e})") from e
            out.append(img.convert("RGB"))
        return out


class DaliDecoder:
    """NVIDIA DALI's GPU (`mixed`) JPEG/PNG decoder; results come back as PIL images.

    Written against DALI's documented pipeline API (external_source + decoders.image); not
    exercised by the CPU test machines (DALI needs CUDA).
    """

    name = "dali"

    def __init__(self) -> None:
        require_dali()

    def decode(self, refs: Sequence[str]) -> list[Any]:
        import numpy as np
        from nvidia.dali import fn, pipeline_def, types
        from PIL import Image

        encoded = [np.frombuffer(image_bytes(r), dtype=np.uint8) for r in refs]

        @pipeline_def(batch_size=len(encoded), num_threads=2, device_id=0)
        def pipe():  # type: ignore[no-untyped-def]
            data = fn.external_source(source=lambda: encoded, batch=True)
            return fn.decoders.image(data, device="mixed", output_type=types.RGB)

        p = pipe()
        p.build()
        try:
            (batch,) = p.run()
        except RuntimeError as e:
            raise ImageError(f"DALI could not decode one of {[describe(r) for r in refs]}: {e}") from e
        return [Image.fromarray(np.asarray(batch.as_cpu().at(i))) for i in range(len(refs))]


def require_dali() -> None:
    """ConfigError naming the install when NVIDIA DALI does not import."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"data.image_decoder=dali needs NVIDIA DALI, which is not installed "
                          f"({e}). Fix: {DALI_INSTALL}; or set data.image_decoder: pil") from e


IMAGE_DECODERS: dict[str, Callable[[], ImageDecoder]] = {"pil": PilDecoder, "dali": DaliDecoder}


def get_decoder(name: str) -> ImageDecoder:
    if name not in IMAGE_DECODERS:
        raise ConfigError(f"data.image_decoder={name!r}; use one of {', '.join(IMAGE_DECODERS)}")
    return IMAGE_DECODERS[name]()


def check_image(ref: str, decoder: ImageDecoder | None = None) -> None:
    """Decode one image (URLs are skipped: the engine fetches them); ImageError if bad."""
    if ref.startswith(_REMOTE):
        return
    (decoder or PilDecoder()).decode([ref])


# ---- Qwen2.5-VL preprocessing ---------------------------------------------------------------

@dataclass(frozen=True)
class VisionProcessing:
    """Sizes the processor needs (from the model's vision config) and the pixel budget."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def __post_init__(self) -> None:
        unit = (self.patch_size * self.merge_size) ** 2
        if not unit <= self.min_pixels <= self.max_pixels:
            raise ConfigError(f"data.image_min_pixels={self.min_pixels} / image_max_pixels="
                              f"{self.max_pixels} must satisfy {unit} (one merged patch) <= min "
                              "<= max")


@dataclass(frozen=True)
class ProcessedImages:
    """pixel_values [P, C*T*p*p] float32, image_grid_thw [N, 3] long (t, h, w in patches)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def tokens_per_image(self, merge_size: int) -> list[int]:
        return [int(n) // merge_size**2 for n in self.image_grid_thw.prod(-1)]


def process_images(images: Sequence[Any], cfg: VisionProcessing) -> ProcessedImages:
    """PIL images -> patches and grids with transformers' Qwen2-VL image processor."""
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                 patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                                 temporal_patch_size=cfg.temporal_patch_size)
    out = proc(images=list(images), return_tensors="pt")
    return ProcessedImages(out["pixel_values"].float(), out["image_grid_thw"].long())


PROCESSOR_CONFIG = "preprocessor_config.json"


def processor_config(cfg: VisionProcessing) -> dict[str, Any]:
    """The `preprocessor_config.json` of a Hugging Face export: what transformers' (and
    SGLang's) Qwen2-VL image processor reads, so a server processes images as the trainer does
    (the same grids, hence the same number of image-pad tokens in the prompt ids)."""
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels,
            "size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
            "patch_size": cfg.patch_size, "merge_size": cfg.merge_size,
            "temporal_patch_size": cfg.temporal_patch_size}


def processing_from_dir(model_dir: str | Path) -> VisionProcessing:
    """The VisionProcessing of a Hugging Face directory's `preprocessor_config.json`
    (ConfigError naming the file when it is missing or incomplete)."""
    import json

    path = Path(model_dir) / PROCESSOR_CONFIG
    try:
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        return VisionProcessing(patch_size=int(raw["patch_size"]), merge_size=int(raw["merge_size"]),
                                temporal_patch_size=int(raw["temporal_patch_size"]),
                                min_pixels=int(raw.get("min_pixels") or size["shortest_edge"]),
                                max_pixels=int(raw.get("max_pixels") or size["longest_edge"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: a vision-language model directory needs its image processor's "
                          f"settings (patch_size, merge_size, temporal_patch_size, min_pixels, "
                          f"max_pixels) there ({type(e).__name__}: {e}). Fix: export the model with "
                          "spark-mcore (it writes the file) or copy the checkpoint's") from e


def portable_ref(ref: str) -> str:
    """An image reference another process or host can read: URLs and data URIs as they are,
    a local file as a data URI of its bytes (a rollout server may not share the filesystem)."""
    if DATA_URI.match(ref) or ref.startswith(_REMOTE):
        return ref
    return bytes_to_data_uri(image_bytes(ref))


def expand_image_pads(ids: Sequence[int], pad_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the i-th single `pad_id` in `ids` by counts[i] copies (one per merged patch)."""
    at = [i for i, t in enumerate(ids) if t == pad_id]
    if len(at) != len(counts):
        raise ValueError(f"the prompt has {len(at)} image placeholders but {len(counts)} images")
    out: list[int] = []
    prev = 0
    for i, n in zip(at, counts, strict=True):
        out += list(ids[prev:i]) + [pad_id] * n
        prev = i + 1
    return out + list(ids[prev:])


VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END


def placeholder_ids(tokenizer: Any, prompt: Any) -> tuple[list[int], int]:
    """Token ids of a prompt with images, one `<|image_pad|>` per image, and the pad's id.

    The images go, in order, at the start of the first user message as
    `<|vision_start|><|image_pad|><|vision_end|>` each (what Qwen2.5-VL's chat template writes
    for image content). The tokenizer must know the tokens (Qwen2.5-VL's does; the built-in
    one gets them from `vision_prompts.add_vision_tokens`)."""
    from spark_mcore.data.chat import render_chat

    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if pad_id is None or pad_id == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer has no {IMAGE_PAD} token: a vision-language model needs "
                          "its own tokenizer (data.tokenizer: the Qwen2.5-VL checkpoint)")
    messages = [dict(m) for m in prompt.messages]
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first]["content"] = IMAGE_PLACEHOLDER * len(prompt.images) + messages[first]["content"]
    return list(tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False)), int(pad_id)


def encode_vl_prompt(tokenizer: Any, prompt: Any, processing: VisionProcessing,
                     decoder: ImageDecoder | None = None) -> tuple[list[int], ProcessedImages | None]:
    """Token ids of a prompt (each image's pad repeated once per merged patch) and its
    processed images; a text prompt gives (encode_prompt ids, None)."""
    from spark_mcore.data.chat import encode_prompt

    if not prompt.images:
        return encode_prompt(tokenizer, prompt), None
    ids, pad_id = placeholder_ids(tokenizer, prompt)
    processed = process_images((decoder or PilDecoder()).decode(prompt.images), processing)
    return expand_image_pads(ids, pad_id, processed.tokens_per_image(processing.merge_size)), processed


def check_prompt_images(prompts: Sequence[Any], family: str, multimodal: bool,
                        where: str = "data.source") -> None:
    """ConfigError when a prompt carries images but the model family is text-only (its run
    would otherwise silently train on the text alone)."""
    with_images = next((p for p in prompts if getattr(p, "images", None)), None)
    if with_images is None or multimodal:
        return
    raise ConfigError(f"{where}: prompt {with_images.id!r} has {len(with_images.images)} image(s) "
                      f"but model.family={family!r} is text-only. Fix: use a vision-language "
                      "model (model.family: qwen2_5_vl) or drop the rows' 'images'")


__all__ = ["DALI_INSTALL", "IMAGE_DECODERS", "DaliDecoder", "ImageDecoder", "ImageError",
           "PilDecoder", "ProcessedImages", "VisionProcessing", "bytes_to_data_uri",
           "IMAGE_PLACEHOLDER", "check_image", "check_prompt_images", "describe", "encode_vl_prompt", "placeholder_ids", "expand_image_pads", "get_decoder", "image_bytes",
           "process_images", "require_dali", "PROCESSOR_CONFIG", "processor_config", "processing_from_dir",
           "portable_ref"]
