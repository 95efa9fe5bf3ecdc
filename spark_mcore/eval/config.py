from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    """Held-out evaluation (greedy decoding).

    max_new_tokens: generation budget per answer.
    limit: evaluate at most this many prompts (0 = all).
    batch_size: prompts per generate() call.
    """

    max_new_tokens: int = 64
    limit: int = 0
    batch_size: int = 256
