"""The transformers rollout engine: `Qwen2ForCausalLM.generate` (or, for a config with a
`vision_config`, `Qwen2_5_VLForConditionalGeneration.generate` with images) in this process.

Used for the CPU demo, for tests, and behind the CPU twin of SGLang (spark_mcore.twin). Weights arrive
as HF-named full tensors from the trainer (`update_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from spark_mcore.models.vision import VisionInputs, canonical_hf_name
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion


def _auto_class(config: PretrainedConfig) -> Any:
    """Vision-language configs (with a vision tower) are image-text-to-text models."""
    vl = getattr(config, "vision_config", None) is not None
    return AutoModelForImageTextToText if vl else AutoModelForCausalLM


class HFEngine:
    """Generates with a transformers causal LM. `decode` turns ids into text."""

    takes_images = True  # generate(..., images=[VisionInputs | None per prompt])

    def __init__(self, hf_config: PretrainedConfig, decode: callable[[list[int]], str],
                 pad_token_id: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 batch_size: int = 256) -> None:
        self.model = _auto_class(hf_config).from_config(hf_config, dtype=dtype).to(device).eval()
        self.decode = decode
        self.pad_token_id = pad_token_id
        self.device = device
        self.batch_size = batch_size
        self.policy_version = 0
        self._names = {n for n, _ in self.model.named_parameters()}

    @classmethod
    def from_pretrained(cls, path: str, decode: callable[[list[int]], str], pad_token_id: int = 0,
                        batch_size: int = 256) -> HFEngine:
        """An engine serving an exported Hugging Face directory (for `spark-mcore eval`)."""
        from transformers import AutoConfig

        model = _auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path)
        engine = cls(model.config, decode, pad_token_id=pad_token_id, dtype=model.dtype, batch_size=batch_size)
        engine.model = model.eval()
        return engine

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        # hub spelling (what the trainer sends) -> this transformers version's in-memory names
        alias = {canonical_hf_name(n): n for n in params}
        seen: set[str] = set()
        for name, tensor in named_tensors:
            name = name if name in params else alias.get(name, name)
            if name not in params:
                raise KeyError(f"weight '{name}' has no parameter in the rollout model; "
                               f"check the model family adapter (known e.g. {sorted(params)[:3]})")
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight '{name}': shape {tuple(tensor.shape)} != engine's "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
            seen.add(name)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = self._names - seen - tied
        if missing:
            raise ValueError(f"weight sync left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}")
        self.policy_version = version

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 images: Sequence[VisionInputs | None] | None = None) -> list[list[Completion]]:
        """images[i]: the processed images of prompt i (its ids hold their expanded pads), or
        None; prompts with images are generated one prompt (n samples) at a time."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        if images is not None and any(i is not None for i in images):
            if len(images) != len(prompt_ids):
                raise ValueError(f"images: {len(images)} entries for {len(prompt_ids)} prompts")
            return [self._generate_batch([ids] * params.n, params, _repeat(vis, params.n))
                    for ids, vis in zip(prompt_ids, images, strict=True)]
        flat = [ids for ids in prompt_ids for _ in range(params.n)]
        out: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            out.extend(self._generate_batch(flat[start:start + self.batch_size], params))
        return [out[i * params.n:(i + 1) * params.n] for i in range(len(prompt_ids))]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams,
                        images: VisionInputs | None = None) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(batch):  # left padding keeps every prompt's last token aligned
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        greedy = params.temperature == 0
        vision: dict[str, Any] = {}
        if images is not None:
            vision = dict(pixel_values=images.pixel_values.to(self.device, self.model.dtype),
                          image_grid_thw=images.image_grid_thw.to(self.device),
                          mm_token_type_ids=(input_ids == self.model.config.image_token_id).int().to(self.device))
        gen = self.model.generate(
            **vision, suppress_tokens=self._vision_token_ids(),
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
            top_k=0 if not greedy else None, eos_token_id=params.stop_token_ids or None,
            pad_token_id=self.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )
        new = gen.sequences[:, width:].cpu()
        scores = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True).cpu()
        return [self._completion(new[i], scores[i], params.stop_token_ids) for i in range(len(batch))]

    def _vision_token_ids(self) -> list[int] | None:
        """A vision-language model must not sample its image/video placeholder tokens: each
        stands for an image's patch in the prompt (the trainer would look for its pixels)."""
        cfg = self.model.config
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        ids = [int(v) for k in keys if (v := getattr(cfg, k, None)) is not None]
        return ids or None

    def _completion(self, ids: torch.Tensor, logps: torch.Tensor, stops: list[int]) -> Completion:
        tokens = ids.tolist()
        finish = "length"
        for j, tok in enumerate(tokens):
            if tok in stops:
                tokens, finish = tokens[: j + 1], "stop"
                break
        lp = logps[: len(tokens)].tolist()
        text_ids = tokens[:-1] if finish == "stop" else tokens
        return Completion(token_ids=tokens, text=self.decode(text_ids), logprobs=lp, finish_reason=finish)

    def shutdown(self) -> None:
        self.model = None  # type: ignore[assignment]


def _repeat(images: VisionInputs | None, n: int) -> VisionInputs | None:
    """The images of one prompt for its n samples (rows in order)."""
    if images is None:
        return None
    return VisionInputs(images.pixel_values.repeat(n, 1), images.image_grid_thw.repeat(n, 1))
