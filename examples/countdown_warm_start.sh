#!/usr/bin/env bash
# The countdown warm start that issue 15's comparison starts from (ws13, docs/spark_in_miniature.md,
# rounds seven to thirteen), in one command, on a CPU:
#
#   bash examples/countdown_warm_start.sh [OUT]        # OUT defaults to runs/countdown_warm_start
#
# Stages (SFT only; every stage starts from the previous one's HF export):
#   d7       800 + 600 + 200 steps with 30 % arithmetic drill; the last 200 also train on judge rows
#            built from the 600-step model's OWN answers (a written check, then the verdict)
#   drill06  +600 steps, drill 60 %                         (round seven's last lever)
#   ws9      +300 steps, the same mixture                   (round nine)
#   ws9b     +300 steps, a half of the drill rows compare numbers digit by digit
#   ws9c     +400 steps, judge batches 50 %, drill 70 %, comparison rows 80 %
#   ws13a    +300 steps, as ws9c with the comparison rows over countdown's own range (targets 1..30)
#   ws13b    +300 steps, every drill row a comparison over that range, drill 80 %
#   ws13     +200 steps, a fifth of the judge-batch rows (a tenth of all rows) are reflection tasks
# (Round eleven's last stage, ws11b, was ws13's 200 steps straight from ws9c, comparisons over
# 1..99: its judge came out at 95 % in one chain and at 67 % when rebuilt, round twelve; ws13a and
# ws13b drill the comparisons that a check of a countdown answer makes; see
# `tools/diagnose_countdown.py --parts be`.)
# A stage whose export exists is kept, so a stopped chain resumes at the stage it was in.
# About 110 min on an otherwise idle 2-core machine (one OpenMP thread per run, as the comparison).
# examples/countdown_compare.sh runs the comparison from it (and runs this script first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/countdown_warm_start}")
CONFIG=examples/configs/compare_countdown_room.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

echo "== d7: three stages with own-judge rows ($(date +%H:%M:%S))"
python tools/compare_spark_grpo.py --task countdown --config "$CONFIG" --seeds 0 --shared-warm-start \
    --continue-steps 600 200 --own-judge-samples 8 --own-judge-prompts 640 --own-judge-share 1.0 \
    --own-judge-per-group 4 --own-judge-fraction 0.6 --own-judge-rationale --sft-set warmstart.drill_share=0.3 \
    --eval-prompts 16 --samples 2 --warm-start-only --out "$OUT/d7"
D7=$(find "$OUT/d7" -maxdepth 1 -type d -name 'warmstart-*' ! -name '*-stage*' | head -n 1)
OWN=$D7-own_judge.jsonl
TOKENIZER=$D7/tokenizer
for path in "$D7/hf/config.json" "$OWN" "$TOKENIZER"; do
    [[ -e $path ]] || { echo "error: the d7 stage left no $path; see the train.log files under $OUT/d7" >&2; exit 1; }
done
ln -sfn "$TOKENIZER" "$OUT/tokenizer"  # every later stage and the comparison load this one

stage() {  # stage NAME FROM STEPS KEY=VALUE...: STEPS more SFT steps from $OUT/FROM's export into $OUT/NAME
    local name=$1 from=$2 steps=$3 item
    shift 3
    if [[ -f $OUT/$name/hf/config.json ]]; then
        echo "== $name: kept ($OUT/$name/hf exists)"
        return
    fi
    echo "== $name: $steps SFT steps from $from ($(date +%H:%M:%S)); log $OUT/$name.log"
    local sets=(trainer.seed=0 data.seed=0 spark.seed=0 trainer.steps=0 "warmstart.steps=$steps"
                warmstart.warmup_steps=5 "model.hf_path=$from/hf" "data.tokenizer=$TOKENIZER"
                "warmstart.judge_file=$OWN" eval.samples=0 eval.limit=4 checkpoint.resume=false
                "checkpoint.dir=$OUT/$name" "$@")
    local args=()
    for item in "${sets[@]}"; do args+=(--set "$item"); done
    if ! spark-mcore train --config "$CONFIG" "${args[@]}" > "$OUT/$name.log" 2>&1; then
        tail -n 20 "$OUT/$name.log" >&2
        echo "error: stage $name failed; its log is $OUT/$name.log. Rerunning this script resumes here." >&2
        exit 1
    fi
}

stage drill06 "$D7" 600 warmstart.judge_fraction=0.6 warmstart.judge_file_share=1.0 warmstart.drill_share=0.6
stage ws9 "$OUT/drill06" 300 warmstart.judge_fraction=0.6 warmstart.judge_file_share=1.0 warmstart.drill_share=0.6
stage ws9b "$OUT/ws9" 300 warmstart.judge_fraction=0.6 warmstart.judge_file_share=1.0 warmstart.drill_share=0.6 \
    warmstart.drill_compare=0.5
stage ws9c "$OUT/ws9b" 400 warmstart.judge_fraction=0.5 warmstart.judge_file_share=1.0 warmstart.drill_share=0.7 \
    warmstart.drill_compare=0.8
stage ws13a "$OUT/ws9c" 300 warmstart.judge_fraction=0.5 warmstart.judge_file_share=1.0 warmstart.drill_share=0.7 \
    warmstart.drill_compare=0.8 warmstart.drill_compare_bound=30
stage ws13b "$OUT/ws13a" 300 warmstart.judge_fraction=0.5 warmstart.judge_file_share=1.0 warmstart.drill_share=0.8 \
    warmstart.drill_compare=1.0 warmstart.drill_compare_bound=30
stage ws13 "$OUT/ws13b" 200 warmstart.judge_fraction=0.5 warmstart.judge_file_share=0.8 warmstart.drill_share=0.7 \
    warmstart.drill_compare=0.8 warmstart.drill_compare_bound=30 'warmstart.judge_kinds=[reflection]'

echo "== done ($(date +%H:%M:%S)): the warm start is $OUT/ws13/hf, its tokenizer $TOKENIZER"
echo "GRPO-only vs SPARK from it: WARM_START=$OUT bash examples/countdown_compare.sh"
