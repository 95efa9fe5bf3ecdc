"""spark_mcore: SPARK (policy and generative reward co-evolving) RL on Megatron-core."""

__version__ = "0.1.0"
