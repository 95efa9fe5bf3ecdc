"""Step metrics: phase timers, a one-line console summary, tensorboard scalars."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoggingConfig:
    """Console and tensorboard output.

    tensorboard: write scalars under <checkpoint.dir>/tb.
    progress: show tqdm bars per phase.
    """

    tensorboard: bool = True
    progress: bool = True


class MetricsLogger:
    """Collects scalars for one step, prints a summary line, appends them to
    `<run_dir>/metrics.jsonl` and writes tensorboard events."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.writer = None
        self.jsonl = Path(run_dir) / "metrics.jsonl" if enabled else None
        if cfg.tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        self.current: dict[str, float] = {}

    @contextmanager
    def timer(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.current[f"time/{phase}"] = self.current.get(f"time/{phase}", 0.0) + time.perf_counter() - start

    def update(self, values: dict[str, float], prefix: str = "") -> None:
        for k, v in values.items():
            self.current[f"{prefix}{k}"] = float(v)

    def flush(self, step: int, header: str, keys: list[str]) -> dict[str, float]:
        """Writes all current scalars at `step`, prints `keys` on one line, and resets."""
        values, self.current = self.current, {}
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.enabled:
            parts = [f"{k.split('/')[-1]}={values[k]:.4g}" for k in keys if k in values]
            print(f"{header} " + " ".join(parts), flush=True)
        return values

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
