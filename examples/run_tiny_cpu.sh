#!/usr/bin/env bash
# The embedded default on a CPU: tiny Qwen2-architecture policy, built-in arith task.
# Extra arguments are passed through, e.g.:  bash examples/run_tiny_cpu.sh --set spark.enabled=true
# NPROC > 1 runs under torchrun (gloo); TP / PP set parallel.tp / parallel.pp, and the data-parallel
# size is NPROC / (TP * PP), e.g.:
#   NPROC=2 bash examples/run_tiny_cpu.sh            # DP2: each rank generates half of every step
#   NPROC=2 TP=2 bash examples/run_tiny_cpu.sh       # TP2
#   NPROC=4 TP=2 PP=2 bash examples/run_tiny_cpu.sh  # TP2 x PP2
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
TP=${TP:-1}
PP=${PP:-1}
if (( NPROC % (TP * PP) != 0 )); then
    echo "NPROC=$NPROC is not a multiple of TP*PP=$((TP * PP))" >&2
    exit 2
fi
ARGS=(train --config examples/configs/tiny_cpu.yaml --set "parallel.tp=$TP" --set "parallel.pp=$PP" "$@")
if (( NPROC == 1 )); then
    exec spark-mcore "${ARGS[@]}"
fi
# the ranks share the machine's cores: cores / NPROC intra-op threads each unless set
THREADS=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}
# --standalone: a local rendezvous on a free port (several runs can share the machine)
exec python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m spark_mcore.cli "${ARGS[@]}"
