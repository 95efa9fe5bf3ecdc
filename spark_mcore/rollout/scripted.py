"""A scripted rollout engine: deterministic completions without a model, for tests of what
surrounds generation (the rollout stream, workers, the loop). Not for training runs.

Each completion's token ids are a function of (prompt ids, sample index, seed); its text is
`\\boxed{k}` with k in 0..9 from the same hash, so verifiers see a mix of right and wrong
answers on small-integer tasks. `delay_s` (or the env var SPARK_SCRIPTED_DELAY_S) sleeps per
generate call to stand in for generation time.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable

import torch

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion


class ScriptedEngine:
    def __init__(self, vocab_size: int = 64, delay_s: float | None = None) -> None:
        self.vocab_size = vocab_size
        self.delay_s = float(os.environ.get("SPARK_SCRIPTED_DELAY_S", "0")) if delay_s is None else delay_s
        self.policy_version = 0

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for ids in prompt_ids:
            comps = []
            for i in range(params.n):
                h = hashlib.sha256(f"{ids}:{i}:{params.seed}".encode()).digest()
                length = 2 + h[0] % max(1, min(params.max_new_tokens, 8) - 1)
                tokens = [3 + b % max(1, self.vocab_size - 3) for b in h[1:1 + length]]
                comps.append(Completion(token_ids=tokens, text=f"\\boxed{{{h[-1] % 10}}}",
                                        logprobs=[-0.5] * len(tokens), finish_reason="stop"))
            out.append(comps)
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        for _ in named_tensors:
            pass
        self.policy_version = version

    def shutdown(self) -> None:
        pass


__all__ = ["ScriptedEngine"]
