"""FIFO of reward samples waiting for a reward step (part of the checkpoint)."""

from __future__ import annotations

from collections import deque
from typing import Any

from spark_mcore.types import REWARD_KINDS, Prompt, RewardSample

_STATE_VERSION = 1


class RewardCache:
    """Bounded FIFO: `add` appends, beyond `max_size` the oldest samples are dropped and
    counted in `dropped`; `pop` takes the oldest first."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"spark.cache_max must be >= 1, got {max_size}")
        self.max_size = max_size
        self._items: deque[RewardSample] = deque()
        self.added = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, samples: list[RewardSample]) -> None:
        for s in samples:
            if not isinstance(s, RewardSample):
                raise TypeError(f"RewardCache.add takes RewardSample items, got {type(s).__name__}")
            self._items.append(s)
            self.added += 1
        while len(self._items) > self.max_size:
            self._items.popleft()
            self.dropped += 1

    def ready(self, batch_size: int) -> bool:
        return batch_size > 0 and len(self._items) >= batch_size

    def peek(self, batch_size: int) -> list[RewardSample]:
        """The `batch_size` oldest samples (at most all of them), left in the cache."""
        return [self._items[i] for i in range(min(max(batch_size, 0), len(self._items)))]

    def pop(self, batch_size: int) -> list[RewardSample]:
        """The `batch_size` oldest samples, removed from the cache."""
        if batch_size < 0 or batch_size > len(self._items):
            raise ValueError(
                f"cannot pop {batch_size} reward samples from a cache holding {len(self._items)}; "
                "check ready(batch_size) first"
            )
        return [self._items.popleft() for _ in range(batch_size)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (prompt metadata must hold JSON values)."""
        return {
            "version": _STATE_VERSION,
            "max_size": self.max_size,
            "added": self.added,
            "dropped": self.dropped,
            "samples": [
                {
                    "kind": s.kind,
                    "label": s.label,
                    "source_prompt_id": s.source_prompt_id,
                    "prompt": s.prompt.to_dict(),
                }
                for s in self._items
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a `state_dict()`; keeps this cache's `max_size` (trimming the oldest)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"spark cache state must be a dict with version {_STATE_VERSION}; the checkpoint is from another format"
            )
        items: deque[RewardSample] = deque()
        for i, row in enumerate(state.get("samples", [])):
            items.append(_sample_from_dict(row, i))
        self._items = items
        self.added = int(state.get("added", len(items)))
        self.dropped = int(state.get("dropped", 0))
        self.add([])  # apply the bound


def _sample_from_dict(row: Any, i: int) -> RewardSample:
    where = f"spark cache state samples[{i}]"
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be a mapping")
    for key in ("kind", "label", "source_prompt_id", "prompt"):
        if key not in row:
            raise ValueError(f"{where} lacks '{key}'")
    if row["kind"] not in REWARD_KINDS:
        raise ValueError(f"{where}.kind {row['kind']!r} is not one of {REWARD_KINDS}")
    try:
        prompt = Prompt.from_dict(row["prompt"])
    except TypeError as e:
        raise ValueError(f"{where}.prompt is not a Prompt record: {e}") from e
    return RewardSample(
        kind=row["kind"], prompt=prompt, source_prompt_id=row["source_prompt_id"], label=row["label"]
    )
