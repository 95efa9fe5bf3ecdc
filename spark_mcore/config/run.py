"""RunConfig: every component's config section; importing it imports neither torch nor megatron
(tests/unit/test_config.py checks that a config error costs no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.checkpoint.config import CheckpointConfig
from spark_mcore.config.loader import ConfigError, build
from spark_mcore.data.config import DataConfig
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.eval.config import EvalConfig
from spark_mcore.metrics import LoggingConfig
from spark_mcore.models.config import ModelConfig, StepHeadConfig
from spark_mcore.rewards.config import RewardConfig
from spark_mcore.rollout.config import RolloutConfig
from spark_mcore.sglang.config import SGLangConfig
from spark_mcore.spark.config import SparkConfig
from spark_mcore.trainer.config import TrainerConfig, WarmStartConfig
from spark_mcore.trainer.features import check_gpu_features
from spark_mcore.transport.config import StreamConfig
from spark_mcore.weights.config import WeightSyncConfig


@dataclass
class RunConfig:
    """A whole run: the sections of a YAML file under examples/configs/."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)  # used when rollout.engine=sglang
    weights: WeightSyncConfig = field(default_factory=WeightSyncConfig)  # trainer -> SGLang weight sync
    transport: StreamConfig = field(default_factory=StreamConfig)  # the stream endpoint, when rollout.source=stream
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    step_head: StepHeadConfig = field(default_factory=StepHeadConfig)  # used when model.step_head=true
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.model.step_head and self.parallel.cp > 1:
            raise ConfigError(f"model.step_head=true reads whole sequences of hidden states, which parallel.cp="
                              f"{self.parallel.cp} splits. Fix: parallel.cp=1, or model.step_head=false")
        check_gpu_features(self.model, self.trainer, self.parallel)
        # checks across sections, before any work (each section checks its own fields)
        if self.spark.reward_kl_coef and self.algo.kl_coef <= 0:
            raise ConfigError(f"spark.reward_kl_coef={self.spark.reward_kl_coef} needs the frozen reference, which "
                              "algo.kl_coef=0 leaves out. Fix: algo.kl_coef > 0 (e.g. 0.001), or spark.reward_kl_coef=null")
        ws, source = self.warmstart, self.data.source
        if ws.steps and ws.judge_fraction > 0 and source not in ("builtin:arith", "builtin:countdown"):
            raise ConfigError(
                f"warmstart.judge_fraction={ws.judge_fraction} builds judge tasks from builtin arith or countdown prompts, "
                f"but data.source={source}. Fix: set warmstart.judge_fraction=0 (the warm start then trains "
                f"on each row's \"solution\"), or warmstart.steps=0")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (None = the embedded default) and apply `a.b=value` overrides."""
    return build(RunConfig, path, overrides)
