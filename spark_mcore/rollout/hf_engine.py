"""The transformers rollout engine: `Qwen2ForCausalLM.generate` in this process.

Used for the CPU demo, for tests, and behind the CPU twin of SGLang (spark_mcore.twin). Weights arrive
as HF-named full tensors from the trainer (`update_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion


class HFEngine:
    """Generates with a transformers causal LM. `decode` turns ids into text."""

    def __init__(self, hf_config: PretrainedConfig, decode: callable[[list[int]], str],
                 pad_token_id: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 batch_size: int = 256) -> None:
        self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device).eval()
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
        model = AutoModelForCausalLM.from_pretrained(path)
        engine = cls(model.config, decode, pad_token_id=pad_token_id, dtype=model.dtype, batch_size=batch_size)
        engine.model = model.eval()
        return engine

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        seen: set[str] = set()
        for name, tensor in named_tensors:
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
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        flat = [ids for ids in prompt_ids for _ in range(params.n)]
        out: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            out.extend(self._generate_batch(flat[start:start + self.batch_size], params))
        return [out[i * params.n:(i + 1) * params.n] for i in range(len(prompt_ids))]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(batch):  # left padding keeps every prompt's last token aligned
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        greedy = params.temperature == 0
        gen = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=params.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
            top_k=0 if not greedy else None, eos_token_id=params.stop_token_ids or None,
            pad_token_id=self.pad_token_id, output_scores=True, return_dict_in_generate=True,
        )
        new = gen.sequences[:, width:].cpu()
        scores = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True).cpu()
        return [self._completion(new[i], scores[i], params.stop_token_ids) for i in range(len(batch))]

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
