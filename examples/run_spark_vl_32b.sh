#!/usr/bin/env bash
# SPARK on Qwen2.5-VL-32B with the paper's hyperparameters (examples/configs/spark_vl_32b.yaml).
#
#   sbatch --nodes=4 --gpus-per-node=8 examples/run_spark_vl_32b.sh         # SLURM: one srun task per node
#   NNODES=2 NODE_RANK=$R NODE_ADDRS=h0,h1 bash examples/run_spark_vl_32b.sh # plain: run on every node
#   NNODES=4 bash examples/run_spark_vl_32b.sh --dry-run                       # print every node's commands
#
# Extra arguments go to the trainer (e.g. --set trainer.steps=10). Environment (defaults below):
# MODEL, DATA, RUN_DIR (shared file system), SGLANG_PYTHON (the rollout environment), SHARED_NCCL,
# ROLLOUT_NODES, GPUS_PER_NODE, TRAINER_TP/TRAINER_PP/SERVER_TP, ROLLOUT_MODE=inline|stream,
# DETERMINISTIC=1 (SGLang --enable-deterministic-inference, so sampling seeds are honoured).
# Layout: `spark-mcore plan --preset qwen2.5-vl-32b --gpus 32`; see examples/launch_common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT="$(pwd)/examples/run_spark_vl_32b.sh"
export CONFIG="${CONFIG:-examples/configs/spark_vl_32b.yaml}"
export MODEL="${MODEL:-/models/Qwen2.5-VL-32B-Instruct}" DATA="${DATA:-/data/spark/vl_math_train.jsonl}" RUN_DIR="${RUN_DIR:-runs/spark_vl_32b}"
export TRAINER_TP="${TRAINER_TP:-8}" TRAINER_PP="${TRAINER_PP:-1}" SERVER_TP="${SERVER_TP:-2}"
export MIN_GPUS=32 PLAN_PRESET=qwen2.5-vl-32b
# shellcheck source=examples/launch_common.sh
source examples/launch_common.sh
spark_launch "$@"
