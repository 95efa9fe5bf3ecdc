#!/usr/bin/env bash
# Disaggregated SPARK on one CPU machine: 1 trainer rank, 2 CPU twin servers and 2 rollout
# workers wired through the trainer's ZeroMQ endpoint (examples/configs/tiny_disaggregated.yaml).
#
#   bash examples/run_tiny_disaggregated.sh [sync|async|both] [--set section.key=value ...]
#
# `both` (the default) runs sync mode, then async mode (rollout.max_staleness=1), and prints the
# trainer's idle time per step (the seconds it waited for the step's groups) of each, with the
# load average before and after each mode. Every process runs one compute thread
# (OMP_NUM_THREADS, default 1; the servers take --threads 1), so that trainer and servers do not
# fight over the cores and overlap is what async mode can win. SERVERS=1 runs one twin server
# (default 2). Every process it starts runs in
# its own session and is tracked: on exit (normal, error or Ctrl-C) the trainer gets SIGINT
# (it stops the servers it launched), then anything left - trainer, servers, workers - is
# killed by process group. Logs: runs/tiny_disaggregated_<mode>/{trainer,worker0,worker1}.log.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-both}
[[ $# -gt 0 ]] && shift
case $MODE in sync|async|both) ;; *) echo "usage: $0 [sync|async|both] [--set k=v ...]" >&2; exit 2 ;; esac
CONFIG=examples/configs/tiny_disaggregated.yaml
SERVERS=${SERVERS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
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
  server_port=$(free_port)  # servers listen on server_port, server_port + 1, ...
  local ports=() urls=() i
  for ((i = 0; i < SERVERS; i++)); do ports+=($((server_port + i))); urls+=("http://127.0.0.1:$((server_port + i))"); done
  local url_list
  url_list=$(IFS=,; echo "${urls[*]}")
  local common=(--config "$CONFIG" --set "checkpoint.dir=$run_dir" --set "rollout.mode=$mode"
                --set "sglang.num_servers=$SERVERS" "$@")
  echo "== $mode: trainer endpoint tcp://127.0.0.1:$stream_port, servers ${urls[*]}; logs in $run_dir;" \
       "load average $(cut -d' ' -f1-3 /proc/loadavg), OMP_NUM_THREADS=$OMP_NUM_THREADS"
  cut -d' ' -f1-3 /proc/loadavg >"$run_dir/loadavg_start"
  setsid spark-mcore train "${common[@]}" --set "transport.bind=tcp://127.0.0.1:$stream_port" \
    --set "sglang.base_port=$server_port" >"$run_dir/trainer.log" 2>&1 &
  trainer=$!
  PIDS+=("$trainer")
  for w in 0 1; do
    setsid spark-mcore rollout-worker --connect "tcp://127.0.0.1:$stream_port" "${common[@]}" --name "worker$w" \
      --set "sglang.urls=[$url_list]" \
      >"$run_dir/worker$w.log" 2>&1 &
    PIDS+=("$!")
  done
  # track the servers too (the trainer launches them in their own sessions and stops them itself)
  local found=0 pid port
  while (( found < SERVERS )) && kill -0 "$trainer" 2>/dev/null; do
    found=0
    for port in "${ports[@]}"; do
      pid=$(server_pid "$port"); [[ -n $pid ]] && found=$((found + 1))
    done
    sleep 1
  done
  for port in "${ports[@]}"; do
    pid=$(server_pid "$port"); [[ -n $pid ]] && PIDS+=("$pid") && echo "   server on port $port: pid $pid"
  done
  status=0
  wait "$trainer" || status=$?
  cut -d' ' -f1-3 /proc/loadavg >"$run_dir/loadavg_end"
  tail -n 8 "$run_dir/trainer.log"
  cleanup
  return "$status"
}

idle_summary() {
  python - "$@" <<'EOF'
import json, sys
from pathlib import Path
# idle = waiting for the step's groups (time/trainer_idle); + push: also waiting for the servers to
# take the new weights (time/sync: a CPU twin finishes its running batch first)
# worker idle = a worker's generation waiting for work (stream/worker_idle, mean over workers,
# at heartbeat resolution)
print("\n| mode | steps | trainer idle per step, s (mean) | idle per step, each | idle + weight push per step, s | worker idle per step, s (mean) | rollout / train / weight push per step, s | load average start -> end |")
print("|---|---|---|---|---|---|---|---|")
for mode in sys.argv[1:]:
    run = Path(f"runs/tiny_disaggregated_{mode}")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/trainer_idle" in r][1:]  # the first step also waits for start-up
    if not steps:
        continue
    mean = lambda k: sum(r.get(k, 0.0) for r in steps) / len(steps)
    load = " -> ".join((run / f).read_text().strip() for f in ("loadavg_start", "loadavg_end") if (run / f).exists())
    each = " ".join(f"{r['time/trainer_idle']:.2f}" for r in steps)
    print(f"| {mode} | {len(steps)} (first excluded) | {mean('time/trainer_idle'):.2f} | {each} | "
          f"{mean('time/trainer_idle') + mean('time/sync'):.2f} | {mean('stream/worker_idle'):.2f} | "
          f"{mean('time/rollout'):.2f} / {mean('time/train'):.2f} / {mean('time/sync'):.2f} | {load} |")
EOF
}

case $MODE in
  both) run_mode sync "$@"; run_mode async "$@"; idle_summary sync async ;;
  *) run_mode "$MODE" "$@"; idle_summary "$MODE" ;;
esac
