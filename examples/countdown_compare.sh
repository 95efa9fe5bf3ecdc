#!/usr/bin/env bash
# Issue 15's comparison, GRPO-only vs SPARK on countdown, in one command, on a CPU:
#
#   bash examples/countdown_compare.sh [OUT] [compare_spark_grpo.py options ...]
#       OUT defaults to runs/countdown_compare; SEEDS="0 1 2" (the default) picks the seeds;
#       WARM_START=DIR (default runs/countdown_warm_start) is where the warm start is built or found.
#
# 1. the warm start (examples/countdown_warm_start.sh: kept when it is there already);
# 2. its evaluation and the shared judge set (`--warm-start-only`, one process);
# 3. every seed as its own process, in parallel (their logs: OUT/seedS.log), PARALLEL at a time
#    (default: MemAvailable / 7 GB, at least 1);
# 4. the table of all seeds (`--report-only`): OUT/results.md and OUT/results.json.
# SPARK's settings are those of the thirteenth round (round eleven's, with one reflection task per
# policy group, spark.reflection_per_prompt=1.0); options given after OUT come last and win
# (e.g. --arms spark, --rl-set spark.reward_n=8). Stopping this script (Ctrl-C,
# SIGTERM) stops the seed processes it started, and their training runs with them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/countdown_compare}")
shift $(( $# > 0 ? 1 : 0 ))
WARM_START=$(realpath -m "${WARM_START:-runs/countdown_warm_start}")
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

bash examples/countdown_warm_start.sh "$WARM_START"
TOKENIZER=$(realpath -m "$WARM_START/tokenizer")  # a link countdown_warm_start.sh makes; resolved: part of the cache key
[[ -f $WARM_START/ws13/hf/config.json && -d $TOKENIZER ]] || {
    echo "error: no warm start in $WARM_START (run examples/countdown_warm_start.sh and read its logs)" >&2; exit 1; }
COMPARE=(python tools/compare_spark_grpo.py --task countdown --config examples/configs/compare_countdown_room.yaml
         --shared-warm-start --eval-prompts 0 --sft-set warmstart.steps=0
         --sft-set "model.hf_path=$WARM_START/ws13/hf" --sft-set "data.tokenizer=$TOKENIZER"
         --rl-set spark.judge_check_weight=0.8 --rl-set spark.reward_n=16 --rl-set spark.reward_kl_coef=0.5
         --rl-set spark.reflection_per_prompt=1.0
         --out "$OUT" "$@")
mkdir -p "$OUT"
echo "== the warm start's evaluation and judge set ($(date +%H:%M:%S)); log $OUT/warm_start.log"
"${COMPARE[@]}" --seeds "${SEED_LIST[0]}" --warm-start-only > "$OUT/warm_start.log" 2>&1 || {
    tail -n 20 "$OUT/warm_start.log" >&2; exit 1; }

# A SPARK trainer here holds 4-7 GB: in round twelve four of them beside the CI suite passed the
# 24 GB and one was OOM-killed. So seeds run in waves of PARALLEL (default: what MemAvailable holds).
PER_SEED_GB=7
avail_gb=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo 2> /dev/null || echo 0)
PARALLEL=${PARALLEL:-$(( avail_gb / PER_SEED_GB > 1 ? avail_gb / PER_SEED_GB : 1 ))}
[[ $PARALLEL =~ ^[1-9][0-9]*$ ]] || { echo "error: PARALLEL must be a positive integer, got '$PARALLEL'" >&2; exit 1; }
PIDS=()
stop_seeds() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done; }
trap 'stop_seeds; exit 130' INT TERM
failed=0
for (( first = 0; first < ${#SEED_LIST[@]}; first += PARALLEL )); do
    WAVE=("${SEED_LIST[@]:first:PARALLEL}")
    echo "== seeds ${WAVE[*]} as parallel processes, $PARALLEL at most (${avail_gb} GB available at the start;" \
         "$(date +%H:%M:%S)); logs $OUT/seed<S>.log"
    PIDS=()
    for seed in "${WAVE[@]}"; do
        "${COMPARE[@]}" --seeds "$seed" > "$OUT/seed$seed.log" 2>&1 &
        PIDS+=($!)
    done
    for i in "${!PIDS[@]}"; do
        if ! wait "${PIDS[$i]}"; then
            echo "error: seed ${WAVE[$i]} failed; its log is $OUT/seed${WAVE[$i]}.log" >&2
            failed=1
        fi
    done
done
trap - INT TERM
(( failed == 0 )) || exit 1
echo "== done ($(date +%H:%M:%S))"
"${COMPARE[@]}" --seeds "${SEED_LIST[@]}" --report-only
