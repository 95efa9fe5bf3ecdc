"""SPARK: recycle verified rollout groups into judge, pairwise and reflection tasks, the
reward-step cache and schedule, and the test-time uses of the model as its own judge."""

from spark_mcore.spark.cache import RewardCache
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.recycler import Recycler
from spark_mcore.spark.schedule import SparkSchedule, StepPlan

__all__ = ["RewardCache", "Recycler", "SparkConfig", "SparkSchedule", "StepPlan"]
