#!/usr/bin/env bash
# The embedded default on a CPU: tiny Qwen2-architecture policy, built-in arith task.
# Extra arguments are passed through, e.g.:  bash examples/run_tiny_cpu.sh --set spark.enabled=true
set -euo pipefail
cd "$(dirname "$0")/.."
exec spark-mcore train --config examples/configs/tiny_cpu.yaml "$@"
