"""The transformers rollout engine: `Qwen2ForCausalLM.generate` (or, for a config with a
`vision_config`, `Qwen2_5_VLForConditionalGeneration.generate` with images) in this process.

Used for the CPU demo, for tests, and behind the CPU twin of SGLang (spark_mcore.twin). Weights arrive
as HF-named full tensors from the trainer (`update_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LogitsProcessor,
    LogitsProcessorList,
    PretrainedConfig,
)

from spark_mcore.models.vision import VisionInputs, canonical_hf_name
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion


class SeededSampler(LogitsProcessor):
    """Per-row seeded sampling for a batch decoded greedily.

    Each step, row r's logits are divided by the temperature, cut to the top-p nucleus and
    normalised; the token is the Gumbel-max draw argmax(log p + g), g from row r's own
    generator (seeded once with `seeds[r]`, one draw of the vocabulary per step). That is an
    exact sample of the tempered, nucleus-filtered distribution, and it depends only on the
    row's seed and logits, not on the other rows of the batch. The returned scores are 0 at
    the chosen token and -inf elsewhere, so greedy decoding takes it; `chosen_logprobs` gives
    log p of each chosen token ([rows, steps])."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p
        self._logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            logp = torch.log_softmax(_nucleus(logp, self.top_p), dim=-1)
        noise = torch.stack([torch.rand(logp.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
        chosen = torch.argmax(logp + gumbel, dim=-1)
        self._logps.append(logp.gather(1, chosen[:, None])[:, 0])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), chosen.to(scores.device)] = 0.0
        return out

    def chosen_logprobs(self) -> torch.Tensor:
        return torch.stack(self._logps, dim=1) if self._logps else torch.zeros(len(self.generators), 0)


def _nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the smallest set of most likely tokens whose mass reaches top_p (the most
    likely token always stays)."""
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
    before = torch.cumsum(sorted_logp.exp(), dim=-1) - sorted_logp.exp()  # mass of the tokens ranked above
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logp.masked_fill(drop, float("-inf"))


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
        None; prompts with images are generated one prompt (n samples) at a time. Sampled rows
        are batched, but each draws its tokens from its own seed (see `SeededSampler`), so a
        completion does not depend on the batch it was generated in."""
        seeds = params.seeds_for(len(prompt_ids))
        if seeds is None:  # unseeded: fresh seeds from the global generator (unused when greedy)
            seeds = (torch.randint(0, 2**62, (len(prompt_ids), params.n)).tolist() if params.temperature > 0
                     else [[0] * params.n for _ in prompt_ids])
        if images is not None and any(i is not None for i in images):
            if len(images) != len(prompt_ids):
                raise ValueError(f"images: {len(images)} entries for {len(prompt_ids)} prompts")
            return [self._generate_batch([ids] * params.n, row_seeds, params, _repeat(vis, params.n))
                    for ids, vis, row_seeds in zip(prompt_ids, images, seeds, strict=True)]
        flat = [(ids, seeds[i][j]) for i, ids in enumerate(prompt_ids) for j in range(params.n)]
        out: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start:start + self.batch_size]
            out.extend(self._generate_batch([ids for ids, _ in chunk], [s for _, s in chunk], params))
        return [out[i * params.n:(i + 1) * params.n] for i in range(len(prompt_ids))]

    def _generate_batch(self, batch: list[list[int]], seeds: list[int], params: SamplingParams,
                        images: VisionInputs | None = None) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(batch):  # left padding keeps every prompt's last token aligned
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        greedy = params.temperature == 0
        sampler = None if greedy else SeededSampler(seeds, params.temperature, params.top_p)
        vision: dict[str, Any] = {}
        if images is not None:
            vision = dict(pixel_values=images.pixel_values.to(self.device, self.model.dtype),
                          image_grid_thw=images.image_grid_thw.to(self.device),
                          mm_token_type_ids=(input_ids == self.model.config.image_token_id).int().to(self.device))
        # sampling runs inside greedy decoding: the sampler's scores have one finite entry
        gen = self.model.generate(
            **vision, suppress_tokens=self._vision_token_ids(),
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
            eos_token_id=params.stop_token_ids or None, pad_token_id=self.pad_token_id,
            output_scores=greedy, return_dict_in_generate=True,
        )
        new = gen.sequences[:, width:].cpu()
        if sampler is not None:
            scores = sampler.chosen_logprobs()
        else:
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
