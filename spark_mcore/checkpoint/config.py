from __future__ import annotations

from dataclasses import dataclass, field

from spark_mcore.config.loader import ConfigError, check_ranges

STEP_PREFIX = "step_"  # a complete checkpoint is <dir>/checkpoints/step_<N> (io.py, convert.py)


@dataclass
class CheckpointConfig:
    """Where the run writes.

    dir: run directory (checkpoints, HF export, tokenizer, tensorboard, eval results).
    save_interval: save every N policy steps (0 = only at the end).
    keep_last: checkpoints kept; older ones are deleted after a successful save.
    export_hf: also write a Hugging Face directory (safetensors + config + tokenizer) at the end.
    resume: continue from the newest complete checkpoint in `dir` when there is one.
    save_on_signal: signals after which the run finishes its current step, saves a checkpoint
        and exits (a second one exits at once). Add "SIGUSR1" for SLURM's
        `#SBATCH --signal=USR1@120` warning before the time limit; [] keeps the default actions.
    """

    dir: str = "runs/tiny"
    save_interval: int = 0
    keep_last: int = 2
    export_hf: bool = True
    resume: bool = True
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT"])

    def __post_init__(self) -> None:
        check_ranges("checkpoint", self, {"save_interval": ">= 0", "keep_last": ">= 1"})
        import signal  # the names must be catchable signals of this platform

        for i, name in enumerate(self.save_on_signal):
            sig = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
            if not isinstance(getattr(signal, sig, None), signal.Signals) or sig in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"checkpoint.save_on_signal[{i}]={name!r} is not a signal this process can "
                                  "catch. Fix: use names like SIGTERM, SIGINT, SIGUSR1")
