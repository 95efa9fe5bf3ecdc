#!/usr/bin/env bash
# Disaggregated SPARK on one CPU machine: 1 trainer rank, 2 CPU twin servers and 2 rollout
# workers wired through the trainer's ZeroMQ endpoint (examples/configs/tiny_disaggregated.yaml).
#
#   bash examples/run_tiny_disaggregated.sh [sync|async|both] [--set section.key=value ...]
#
# `both` (the default) runs sync mode, then async mode (rollout.max_staleness=1), and prints the
# trainer's idle time per step (waiting for rollouts) of each. Every process it starts runs in
# its own session and is tracked: on exit (normal, error or Ctrl-C) the trainer gets SIGINT
# (it stops the servers it launched), then anything left - trainer, servers, workers - is
# killed by process group. Logs: runs/tiny_disaggregated_<mode>/{trainer,worker0,worker1}.log.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-both}
[[ $# -gt 0 ]] && shift
case $MODE in sync|async|both) ;; *) echo "usage: $0 [sync|async|both] [--set k=v ...]" >&2; exit 2 ;; esac
CONFIG=examples/configs/tiny_disaggregated.yaml
PIDS=()

free_port() { python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

stop_group() {  # stop_group PID SIGNAL: signal the process group PID leads, if it is still there
  kill -"$2" -- "-$1" 2>/dev/null || true
}

cleanup() {
  local pid deadline
  for pid in "${PIDS[@]}"; do stop_group "$pid" INT; done
  deadline=$((SECONDS + 20))
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    stop_group "$pid" KILL
  done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

server_pid() {  # the process listening on 127.0.0.1:PORT (a server the trainer launched)
  ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}

run_mode() {
  local mode=$1; shift
  local run_dir=runs/tiny_disaggregated_$mode stream_port server_port trainer status
  rm -rf "$run_dir" && mkdir -p "$run_dir"
  stream_port=$(free_port)
  server_port=$(free_port)  # servers listen on server_port and server_port + 1
  local common=(--config "$CONFIG" --set "checkpoint.dir=$run_dir" --set "rollout.mode=$mode" "$@")
  echo "== $mode: trainer endpoint tcp://127.0.0.1:$stream_port, servers http://127.0.0.1:$server_port,+1; logs in $run_dir"
  setsid spark-mcore train "${common[@]}" --set "transport.bind=tcp://127.0.0.1:$stream_port" \
    --set "sglang.base_port=$server_port" >"$run_dir/trainer.log" 2>&1 &
  trainer=$!
  PIDS+=("$trainer")
  for w in 0 1; do
    setsid spark-mcore rollout-worker --connect "tcp://127.0.0.1:$stream_port" "${common[@]}" --name "worker$w" \
      --set "sglang.urls=[http://127.0.0.1:$server_port,http://127.0.0.1:$((server_port + 1))]" \
      >"$run_dir/worker$w.log" 2>&1 &
    PIDS+=("$!")
  done
  # track the servers too (the trainer launches them in their own sessions and stops them itself)
  local found=0 pid port
  while (( found < 2 )) && kill -0 "$trainer" 2>/dev/null; do
    found=0
    for port in "$server_port" $((server_port + 1)); do
      pid=$(server_pid "$port"); [[ -n $pid ]] && found=$((found + 1))
    done
    sleep 1
  done
  for port in "$server_port" $((server_port + 1)); do
    pid=$(server_pid "$port"); [[ -n $pid ]] && PIDS+=("$pid") && echo "   server on port $port: pid $pid"
  done
  status=0
  wait "$trainer" || status=$?
  tail -n 8 "$run_dir/trainer.log"
  cleanup
  return "$status"
}

idle_summary() {
  python - "$@" <<'EOF'
import json, sys
from pathlib import Path
print("\n| mode | steps (policy + reward) | trainer idle per step, s (mean) | rollout per step, s | train per step, s |")
print("|---|---|---|---|---|")
for mode in sys.argv[1:]:
    rows = [json.loads(l) for l in Path(f"runs/tiny_disaggregated_{mode}/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/trainer_idle" in r][1:]  # the first step also waits for start-up
    if not steps:
        continue
    mean = lambda k: sum(r.get(k, 0.0) for r in steps) / len(steps)
    print(f"| {mode} | {len(steps)} (first step excluded) | {mean('time/trainer_idle'):.2f} | "
          f"{mean('time/rollout'):.2f} | {mean('time/train'):.2f} |")
EOF
}

case $MODE in
  both) run_mode sync "$@"; run_mode async "$@"; idle_summary sync async ;;
  *) run_mode "$MODE" "$@"; idle_summary "$MODE" ;;
esac
