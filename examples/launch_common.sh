# shellcheck shell=bash
# Shared launcher of examples/run_spark_*.sh: trainer ranks under torchrun on the trainer nodes,
# SGLang servers on the rollout nodes' GPUs (never the trainer's), optional rollout workers
# streaming over ZeroMQ. Sourced, not run: the caller sets the defaults below first.
#
# Topology. With NNODES >= 2 the first NNODES - ROLLOUT_NODES nodes run the trainer on all their
# GPUs and the last ROLLOUT_NODES nodes run SGLang servers of SERVER_TP GPUs each. With one node,
# GPUs 0..(GPUS_PER_NODE - ROLLOUT_GPUS - 1) train and the remaining ROLLOUT_GPUS serve.
#
# Where nodes come from: under SLURM (sbatch), the script re-runs itself once per node through
# `srun --ntasks-per-node=1` and reads SLURM_NNODES / SLURM_NODEID / the node list; otherwise set
# NNODES, NODE_RANK, NODE_ADDRS (comma-separated, in node-rank order), MASTER_ADDR (default: the
# first node), GPUS_PER_NODE, and run the script on every node. `--dry-run` prints every node's
# commands without running anything (placeholder hosts node0, node1, ... unless NODE_ADDRS is set).
#
# Processes: every child runs in its own session (setsid) and is tracked by PID; on exit, error or
# Ctrl-C the script signals exactly those process groups (TERM, then KILL after KILL_AFTER_S).
# Nothing is killed by name. Trainer node 0 writes RUN_DIR/.launch_done when training ends;
# rollout nodes (RUN_DIR must be on a shared file system) stop their servers when they see it.

set -euo pipefail

: "${CONFIG:?set CONFIG}" "${MODEL:?set MODEL}" "${DATA:?set DATA}" "${RUN_DIR:?set RUN_DIR}"
: "${TRAINER_TP:=1}" "${TRAINER_PP:=1}" "${SERVER_TP:=1}"
: "${GPUS_PER_NODE:=8}" "${MASTER_PORT:=29500}" "${SGLANG_BASE_PORT:=30000}" "${SGLANG_PORT_STRIDE:=10}"
: "${SGLANG_PYTHON:=/opt/sglang/bin/python}"   # the rollout environment (docker/Dockerfile.rollout)
: "${SGLANG_MEM_FRACTION:=0.85}" "${SGLANG_EXTRA:=}" "${DETERMINISTIC:=0}"
: "${SHARED_NCCL:=}"                           # one libnccl.so.2 preloaded in trainer and servers
: "${ROLLOUT_MODE:=inline}"                    # inline: trainer drives the servers; stream: workers
: "${STREAM_PORT:=5555}" "${KILL_AFTER_S:=30}" "${POLL_S:=10}"
: "${MIN_GPUS:=0}" "${PLAN_PRESET:=}"

# torchrun / torch.distributed variables a launched server must not inherit: SGLang starts its own
# process group and would wait on the trainer's store (fault 4).
SCRUB_VARS=(RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_NAME
            ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT TORCHELASTIC_USE_AGENT_STORE TORCHELASTIC_RUN_ID
            TORCHELASTIC_RESTART_COUNT TORCHELASTIC_MAX_RESTARTS TORCHELASTIC_ERROR_FILE TORCH_NCCL_ASYNC_ERROR_HANDLING)

DRY_RUN=0
TRAINER_ARGS=()
PIDS=()
NAMES=()

spark_parse_args() {
  local arg
  for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else TRAINER_ARGS+=("$arg"); fi
  done
}

seq_csv() {  # seq_csv FIRST COUNT -> "FIRST,FIRST+1,..."
  local first=$1 count=$2 out="" i
  for ((i = first; i < first + count; i++)); do out+="${out:+,}$i"; done
  printf '%s' "$out"
}

spark_topology() {
  if ((NNODES == 1)); then
    : "${ROLLOUT_GPUS:=$((GPUS_PER_NODE / 2))}"
    ROLLOUT_NODES=0
    TRAINER_NODES=1
    TRAINER_GPUS_PER_NODE=$((GPUS_PER_NODE - ROLLOUT_GPUS))
  else
    : "${ROLLOUT_NODES:=$((NNODES / 2))}"
    TRAINER_NODES=$((NNODES - ROLLOUT_NODES))
    TRAINER_GPUS_PER_NODE=$GPUS_PER_NODE
    ROLLOUT_GPUS=$GPUS_PER_NODE
  fi
  if ((TRAINER_NODES < 1 || ROLLOUT_GPUS < SERVER_TP || ROLLOUT_GPUS % SERVER_TP)); then
    echo "error: $NNODES node(s) x $GPUS_PER_NODE GPUs leave no trainer node or a rollout share ($ROLLOUT_GPUS GPUs)" \
         "that is not a multiple of SERVER_TP=$SERVER_TP; set ROLLOUT_NODES / ROLLOUT_GPUS" >&2
    return 2
  fi
  SERVERS_PER_NODE=$((ROLLOUT_GPUS / SERVER_TP))
}

node_addr() { local -a addrs; IFS=, read -r -a addrs <<<"$NODE_ADDRS"; printf '%s' "${addrs[$1]}"; }

# rollout GPUs of node $1 start here (after the trainer's on a shared node, else at 0)
rollout_first_gpu() { if ((NNODES == 1)); then printf '%s' "$TRAINER_GPUS_PER_NODE"; else printf '0'; fi; }

is_rollout_node() { ((NNODES == 1 || $1 >= TRAINER_NODES)); }
is_trainer_node() { ((NNODES == 1 || $1 < TRAINER_NODES)); }

server_urls() {  # all servers, in node order (the trainer attaches to these)
  local out="" node k
  for ((node = 0; node < NNODES; node++)); do
    is_rollout_node "$node" || continue
    for ((k = 0; k < SERVERS_PER_NODE; k++)); do
      out+="${out:+,}http://$(node_addr "$node"):$((SGLANG_BASE_PORT + k * SGLANG_PORT_STRIDE))"
    done
  done
  printf '[%s]' "$out"
}

preload_env() { if [[ -n "$SHARED_NCCL" ]]; then printf 'LD_PRELOAD=%s' "$SHARED_NCCL"; fi; }

start() {  # start NODE NAME CMD... : print (dry run) or run in its own session, tracked
  local node=$1 name=$2
  shift 2
  if ((DRY_RUN)); then
    printf 'node %s [%s] %s\n' "$node" "$name" "$*"
    return 0
  fi
  mkdir -p "$LOG_DIR"
  setsid "$@" >"$LOG_DIR/$name.log" 2>&1 &
  PIDS+=("$!")
  NAMES+=("$name")
  echo "node $node: started $name (pid $!, log $LOG_DIR/$name.log)"
}

stop_children() {  # TERM each tracked process group, KILL what is left after KILL_AFTER_S
  local pid deadline=$((SECONDS + KILL_AFTER_S)) alive
  ((${#PIDS[@]})) || return 0
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "${PIDS[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
    ((alive)) || return 0
    sleep 1
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

trainer_command() {  # the trainer ranks of node $1
  local node=$1 addr
  addr=$(node_addr "$node")
  local -a cmd=(env "CUDA_VISIBLE_DEVICES=$(seq_csv 0 "$TRAINER_GPUS_PER_NODE")" "SPARK_NODE_ADDR=$addr")
  [[ -z "$SHARED_NCCL" ]] || cmd+=("$(preload_env)")
  cmd+=(torchrun "--nnodes=$TRAINER_NODES" "--node-rank=$node" "--nproc-per-node=$TRAINER_GPUS_PER_NODE"
        "--master-addr=$MASTER_ADDR" "--master-port=$MASTER_PORT"
        -m spark_mcore.cli train --config "$CONFIG"
        --set "model.hf_path=$MODEL" --set "data.source=$DATA" --set "checkpoint.dir=$RUN_DIR"
        --set "parallel.tp=$TRAINER_TP" --set "parallel.pp=$TRAINER_PP"
        --set "sglang.urls=$(server_urls)" --set "sglang.gpus_per_server=$SERVER_TP"
        --set "weights.master_address=$addr")
  if [[ "$ROLLOUT_MODE" == "stream" ]]; then  # the trainer's ZeroMQ endpoint (issue 12's stream source)
    cmd+=(--set "rollout.source=stream" --set "transport.bind=tcp://$MASTER_ADDR:$STREAM_PORT")
  fi
  start "$node" trainer "${cmd[@]}" "${TRAINER_ARGS[@]}"
}

server_commands() {  # SGLang servers (and stream workers) of node $1
  local node=$1 addr first k gpus port urls=""
  addr=$(node_addr "$node")
  first=$(rollout_first_gpu)
  local -a scrub=()
  for k in "${SCRUB_VARS[@]}"; do scrub+=(-u "$k"); done
  for ((k = 0; k < SERVERS_PER_NODE; k++)); do
    gpus=$(seq_csv $((first + k * SERVER_TP)) "$SERVER_TP")
    port=$((SGLANG_BASE_PORT + k * SGLANG_PORT_STRIDE))
    urls+="${urls:+,}http://$addr:$port"
    local -a cmd=(env "${scrub[@]}" "CUDA_VISIBLE_DEVICES=$gpus")
    [[ -z "$SHARED_NCCL" ]] || cmd+=("$(preload_env)")
    cmd+=("$SGLANG_PYTHON" -m sglang.launch_server --model-path "$MODEL" --host "$addr" --port "$port"
          --tp-size "$SERVER_TP" --base-gpu-id 0 --mem-fraction-static "$SGLANG_MEM_FRACTION")
    ((DETERMINISTIC == 0)) || cmd+=(--enable-deterministic-inference)
    # shellcheck disable=SC2206  # SGLANG_EXTRA is a list of flags, split on purpose
    [[ -z "$SGLANG_EXTRA" ]] || cmd+=($SGLANG_EXTRA)
    start "$node" "sglang-$k" "${cmd[@]}"
  done
  if [[ "$ROLLOUT_MODE" == "stream" ]]; then
    start "$node" "rollout-worker" env CUDA_VISIBLE_DEVICES= spark-mcore rollout-worker \
      --connect "tcp://$MASTER_ADDR:$STREAM_PORT" --config "$CONFIG" --set "sglang.urls=[$urls]" \
      --set "data.source=$DATA"
  fi
}

node_commands() {
  local node=$1
  if ((DRY_RUN)); then
    local role="" ; is_trainer_node "$node" && role+=" trainer($TRAINER_GPUS_PER_NODE GPUs)"
    is_rollout_node "$node" && role+=" sglang($SERVERS_PER_NODE x tp$SERVER_TP)"
    echo "# node $node ($(node_addr "$node")):$role"
  fi
  if is_rollout_node "$node"; then server_commands "$node"; fi
  if is_trainer_node "$node"; then trainer_command "$node"; fi
}

spark_from_slurm() {  # fills NNODES / NODE_RANK / NODE_ADDRS inside an srun task
  NNODES=$SLURM_NNODES
  NODE_RANK=$SLURM_NODEID
  NODE_ADDRS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
}

wait_on_node() {  # trainer nodes wait for torchrun; rollout-only nodes for the done marker
  local node=$1 rc=0 i
  if is_trainer_node "$node"; then
    wait "${PIDS[-1]}" || rc=$?
    if ((node == 0)); then touch "$RUN_DIR/.launch_done"; fi
    return "$rc"
  fi
  while [[ ! "$RUN_DIR/.launch_done" -nt "$LOG_DIR/.started" ]]; do
    for i in "${!PIDS[@]}"; do
      if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        echo "node $node: ${NAMES[$i]} exited early; see $LOG_DIR/${NAMES[$i]}.log" >&2
        return 1
      fi
    done
    sleep "$POLL_S"
  done
}

spark_launch() {
  spark_parse_args "$@"
  if ((!DRY_RUN)) && [[ -n "${SLURM_JOB_ID:-}" && -z "${SPARK_IN_SRUN:-}" ]]; then
    exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 env SPARK_IN_SRUN=1 bash "$SCRIPT" "$@"
  fi
  if [[ -n "${SPARK_IN_SRUN:-}" ]]; then spark_from_slurm; fi
  : "${NNODES:=2}" "${NODE_RANK:=0}"
  if [[ -z "${NODE_ADDRS:-}" ]]; then
    if ((!DRY_RUN && NNODES > 1)); then echo "error: set NODE_ADDRS=host0,host1,... (node-rank order)" >&2; return 2; fi
    NODE_ADDRS=$(for ((i = 0; i < NNODES; i++)); do printf 'node%s\n' "$i"; done | paste -sd, -)
    ((NNODES > 1)) || NODE_ADDRS=127.0.0.1
  fi
  : "${MASTER_ADDR:=$(node_addr 0)}"
  spark_topology
  if ((NNODES * GPUS_PER_NODE < MIN_GPUS)); then
    echo "WARNING: $((NNODES * GPUS_PER_NODE)) GPUs are fewer than the $MIN_GPUS that" \
         "\`spark-mcore plan --preset $PLAN_PRESET\` finds feasible; the trainer will not fit" >&2
  fi
  if ((DRY_RUN)); then
    echo "# $NNODES node(s) x $GPUS_PER_NODE GPUs: trainer tp$TRAINER_TP pp$TRAINER_PP on $TRAINER_NODES node(s)," \
         "SGLang tp$SERVER_TP x $SERVERS_PER_NODE per rollout node, rollout mode $ROLLOUT_MODE"
    for ((i = 0; i < NNODES; i++)); do node_commands "$i"; done
    return 0
  fi
  LOG_DIR="$RUN_DIR/logs/node$NODE_RANK"
  mkdir -p "$LOG_DIR"
  touch "$LOG_DIR/.started"
  trap stop_children EXIT
  trap 'exit 130' INT TERM
  node_commands "$NODE_RANK"
  wait_on_node "$NODE_RANK"
}
