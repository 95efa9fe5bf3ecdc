from __future__ import annotations

from dataclasses import dataclass

STEP_PREFIX = "step_"  # a complete checkpoint is <dir>/checkpoints/step_<N> (io.py, convert.py)


@dataclass
class CheckpointConfig:
    """Where the run writes.

    dir: run directory (checkpoints, HF export, tokenizer, tensorboard, eval results).
    save_interval: save every N policy steps (0 = only at the end).
    keep_last: checkpoints kept; older ones are deleted after a successful save.
    export_hf: also write a Hugging Face directory (safetensors + config + tokenizer) at the end.
    resume: continue from the newest complete checkpoint in `dir` when there is one.
    """

    dir: str = "runs/tiny"
    save_interval: int = 0
    keep_last: int = 2
    export_hf: bool = True
    resume: bool = True
