"""Rollout and train time per GRPO step of `spark-mcore train` at world size 1 against DP2
(torchrun, 2 processes) on this machine.

    python tools/bench_loop_scaling.py                 # 2 interleaved pairs of runs, 4 steps each
    python tools/bench_loop_scaling.py --pairs 3 --steps 6 --prompts 16
    python tools/bench_loop_scaling.py --quick         # 1 pair, 2 steps (a smoke test)

Runs alternate (world size 1, DP2, world size 1, DP2, ...) so machine load drifts hit both
alike. Each run is the tiny model on the built-in arith task with no warm start (its time is
not a step's), a small held-out set, and `data.prompts_per_step` x `rollout.n` responses per
step; the step times come from the run's metrics.jsonl (`time/rollout`: generation, verification
and the exchange of rows; `time/train`: old/ref log-probs and the GRPO update). The first step
of each run is dropped (warm-up). Threads: by default every process gets one intra-op thread
(`--threads 1`), so DP2 uses twice the cores of world size 1: the ratio is what data
parallelism buys. `--threads 0` instead splits `--cores` between the processes (world size 1
gets them all, each DP2 rank half): the same cores for both; on a loaded machine two OpenMP
threads that wait for each other can be much slower than one. Prints per-run medians, the
medians over runs, and as its last line the ratio of world size 1's (rollout + train) time per
step to DP2's (above 1: DP2 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from spark_mcore.distributed.parallel import find_free_port


def _command(nproc: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    sets = [f"checkpoint.dir={run_dir}", "warmstart.steps=0", f"trainer.steps={args.steps}",
            f"data.prompts_per_step={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.tokens}",
            "eval.limit=8", "eval.samples=0", f"eval.max_new_tokens={args.tokens}", "logging.progress=false",
            "logging.tensorboard=false", "checkpoint.export_hf=false", "checkpoint.save_interval=0"]
    tail = ["-m", "spark_mcore.cli", "train", "--config", str(args.config),
            *[a for kv in sets for a in ("--set", kv)]]
    if nproc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(find_free_port()), *tail]


def _run(nproc: int, root: Path, index: int, args: argparse.Namespace) -> dict[str, float]:
    run_dir = root / f"run{index}_n{nproc}"
    threads = args.threads or max(1, args.cores // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(_command(nproc, run_dir, args), capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"world size {nproc} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    if not steps:
        raise SystemExit("need --steps >= 2 (the first step is dropped)")
    out = {k: statistics.median(s[f"time/{k}"] for s in steps) for k in ("rollout", "train")}
    out["responses_this_rank"] = statistics.median(s["rollout/responses_this_rank"] for s in steps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2, help="interleaved (world size 1, DP2) pairs of runs")
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per run (the first is dropped)")
    p.add_argument("--prompts", type=int, default=16, help="data.prompts_per_step")
    p.add_argument("--n", type=int, default=8, help="rollout.n")
    p.add_argument("--tokens", type=int, default=32, help="rollout.max_new_tokens")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (0: split --cores)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores to split with --threads 0")
    p.add_argument("--config", default=Path(__file__).resolve().parents[1] / "examples/configs/tiny_cpu.yaml")
    p.add_argument("--quick", action="store_true", help="1 pair of 2-step runs")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.steps = 1, 2
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        for i in range(args.pairs):
            for nproc in (1, 2):  # A B A B
                res = _run(nproc, Path(tmp), i, args)
                results[nproc].append(res)
                print(f"run {i} world size {nproc}: rollout {res['rollout']:.3f}s train {res['train']:.3f}s per step "
                      f"({res['responses_this_rank']:.0f} responses on rank 0)", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("rollout", "train")} for n, rs in results.items()}
    for n, label in ((1, "world size 1"), (2, "DP2")):
        print(f"{label}: rollout {med[n]['rollout']:.3f}s train {med[n]['train']:.3f}s per step (median of "
              f"{args.pairs} runs)")
    print(f"rollout speedup {med[1]['rollout'] / med[2]['rollout']:.2f}, train speedup "
          f"{med[1]['train'] / med[2]['train']:.2f}")
    total = {n: med[n]["rollout"] + med[n]["train"] for n in med}
    print(f"world size 1 / DP2 (rollout + train per step): {total[1] / total[2]:.2f}")


if __name__ == "__main__":
    main()
