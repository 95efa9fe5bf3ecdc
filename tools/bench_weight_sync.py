"""Bandwidth of the bucketed weight sync vs ONE raw broadcast of the same bytes, same group.

    python tools/bench_weight_sync.py [--total-mb 1024] [--bucket-mb 512] [--alone-mb 64] [--first-bucket-mb 16]
                                      [--repeats 9] [--runs 3] [--hidden 3584 --ffn 18944] [--source-dtype bf16|fp32]
                                      [--layout views|separate] [--backend auto]

Two processes form a weight-update group (spark_mcore.weights.groups, the same rendezvous as
with SGLang). Rank 0 holds synthetic decoder layers with Qwen2.5-7B's tensor shapes (about
--total-mb of bf16 on the wire) in --source-dtype (bf16 = Megatron bf16 params; fp32 adds the
cast); rank 1 holds bf16 weights. --layout views (default): the sender's weights are views of
one flat buffer, as Megatron keeps its parameters with the distributed optimizer (DDP's
contiguous param buffers); separate: one allocation per tensor, as after a TP merge. On the
2-core CPU VM, gloo sends from many separate allocations about 5 % slower than from one
buffer with no bucketing code involved (pre-packed separate buffers vs slices of one buffer),
so `separate` measures that effect on top of the sync's own overhead.
  A  bucketed sync: BucketSender.send with the run's defaults (tensors of >= --alone-mb already
     in bf16 go alone from their own memory, the rest is cast while packed into buckets that
     ramp up from --first-bucket-mb to --bucket-mb, one broadcast per bucket, bucket k+1 packed
     while k is on the wire, buffers kept between syncs); the receiver joins each broadcast
     with receive_bucket into its reused bucket buffer and rebuilds the tensors as views.
  B  raw: one broadcast of a preallocated flat buffer holding the same bytes, nothing else.
  L  = A plus the receiver copying every tensor into its weights (load_into), reported apart:
     in SGLang's protocol that copy is serialized with the next bucket.
--repeats cycles of A and B (A B, then B A: each runs first equally often), then --repeats
cycles of L and B (L B, then B L), each with its own ratio: L's receiver-side copy of every
weight slows whatever trial comes next on a shared machine (dirty caches, CPU share), so it
is kept out of the A/B cycles. Each trial starts after a 1-element broadcast from rank 0 and
ends when rank 1 is done (a 1-element broadcast back), timed on rank 0. The last line is the
median of the per-cycle ratios A/B in bandwidth. NCCL is used with >= 2 GPUs, else gloo (CPU).
The HTTP announce of the real sync is replaced by a no-op (one small request per bucket).
On a shared machine single cycles swing both ways by tens of percent, and whole process pairs
by up to 10 %: --runs fresh pairs (default 3) each run every cycle, and the last line pools
all their cycles (the per-pair medians are printed above it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_mcore.sglang.client import PendingCalls  # noqa: E402
from spark_mcore.twin.receiver import load_into, receive_bucket  # noqa: E402
from spark_mcore.weights.bucket import plan_buckets  # noqa: E402
from spark_mcore.weights.config import WeightSyncConfig  # noqa: E402
from spark_mcore.weights.groups import create_master_store, join_weight_update_group  # noqa: E402
from spark_mcore.weights.sync import BucketSender  # noqa: E402

PARAMS_7B, PARAMS_32B = 7.6e9, 32.8e9


def synthetic_shapes(total_bytes: int, hidden: int = 3584, ffn: int = 18944, kv: int = 512,
                     ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of Qwen2-like decoder layers (default: Qwen2.5-7B's hidden 3584, ffn 18944,
    4 kv heads x 128) - as many as fit `total_bytes` in bf16, at least one. No embedding (1 GB
    for 7B); the layer tensors are what dominates a sync."""
    qkv = hidden + 2 * kv
    layer = [("self_attn.qkv.weight", (qkv, hidden)), ("self_attn.qkv.bias", (qkv,)),
             ("self_attn.o_proj.weight", (hidden, hidden)), ("mlp.gate_proj.weight", (ffn, hidden)),
             ("mlp.up_proj.weight", (ffn, hidden)), ("mlp.down_proj.weight", (hidden, ffn)),
             ("input_layernorm.weight", (hidden,)), ("post_attention_layernorm.weight", (hidden,))]
    per_layer = sum(2 * torch.Size(s).numel() for _, s in layer)
    layers = max(1, total_bytes // per_layer)
    return [(f"model.layers.{i}.{n}", s) for i in range(layers) for n, s in layer]


def _synthetic_weights(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: torch.device,
                       layout: str) -> dict[str, torch.Tensor]:
    """Random weights: "views" = views of one flat buffer, as a Megatron model with the
    distributed optimizer holds its parameters (DDP's contiguous param buffers) and as our TP
    gather returns them; "separate" = one allocation per tensor."""
    if layout == "separate":
        return {n: torch.randn(s, device=device).to(dtype) for n, s in shapes}
    sizes = [torch.Size(s).numel() for _, s in shapes]
    flat = torch.randn(sum(sizes), device=device).to(dtype)
    return {n: t.view(s) for (n, s), t in zip(shapes, flat.split(sizes), strict=True)}


class _NoHTTP:
    """Stands in for ServerCalls: the announce is answered at once."""

    def post(self, path: str, body_for: Any, retry: bool = True) -> tuple[PendingCalls, list[Future]]:
        return PendingCalls([]), []


def _sync_marker(group: Any, src: int, device: torch.device) -> None:
    group.broadcast(torch.zeros(1, device=device), src=src)


def _worker(rank: int, q: Any, args: argparse.Namespace, backend: str, out: Any) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if rank == 0:
        store = create_master_store("127.0.0.1", 0, 2, 300)
        q.put(store.port)
        group = join_weight_update_group("127.0.0.1", store.port, 0, 2, "bench", backend, 300, store=store)
    else:
        group = join_weight_update_group("127.0.0.1", q.get(), 1, 2, "bench", backend, 300)
    shapes = synthetic_shapes(int(args.total_mb * 2**20), args.hidden, args.ffn)
    cfg = WeightSyncConfig(bucket_mb=args.bucket_mb, wire_dtype="bf16", alone_mb=args.alone_mb,
                           first_bucket_mb=args.first_bucket_mb)
    wire_bytes = sum(2 * torch.Size(s).numel() for _, s in shapes)
    if rank == 0:
        source = torch.float32 if args.source_dtype == "fp32" else torch.bfloat16
        weights = _synthetic_weights(shapes, source, device, args.layout)
        # B sends the very bytes A sends, from written memory: a never-written buffer reads as
        # the kernel's shared zero page, which makes the sender's copy artificially cheap.
        raw = torch.cat([t.to(torch.bfloat16).reshape(-1).view(torch.uint8) for t in weights.values()])
        sender = BucketSender(cfg, "bench")
        sender.group = group
    else:
        raw = torch.zeros(wire_bytes, dtype=torch.uint8, device=device)
        weights = {n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in shapes}
        headers = plan_buckets([(n, torch.bfloat16, s) for n, s in shapes], cfg.bucket_bytes, cfg.alone_bytes,
                               zero_copy=args.source_dtype == "bf16", first_bucket_bytes=cfg.first_bucket_bytes)
        # a receiver keeps its bucket buffer between buckets and syncs, as the test server does
        recv_buf = torch.empty(max(h.nbytes for h in headers), dtype=torch.uint8, device=device)

    def trial(kind: str) -> float:
        _sync_marker(group, 0, device)
        start = time.perf_counter()
        if kind in "AL" and rank == 0:
            sender.send(_NoHTTP(), weights.items(), version=None)  # type: ignore[arg-type]
        elif kind in "AL":
            for h in headers:
                named = receive_bucket(group, h, flattened=True, device=device, buffer=recv_buf)
                if kind == "L":
                    load_into(weights, named)
        else:
            group.broadcast(raw, src=0)
        _sync_marker(group, 1, device)
        if backend == "nccl":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    trial("A"), trial("B"), trial("L")  # warm-up (allocations, connections)
    times: dict[str, list[float]] = {"A": [], "B": [], "L": [], "B_L": []}
    for pair, raw_key in (("AB", "B"), ("LB", "B_L")):
        for cycle in range(args.repeats):
            for kind in pair if cycle % 2 == 0 else pair[::-1]:
                times[raw_key if kind == "B" else kind].append(trial(kind))
    if rank == 0:
        out.put({"times": times, "bytes": wire_bytes, "tensors": len(shapes),
                 "buckets": len(plan_buckets([(n, torch.bfloat16, s) for n, s in shapes], cfg.bucket_bytes,
                                             cfg.alone_bytes, zero_copy=args.source_dtype == "bf16",
                                             first_bucket_bytes=cfg.first_bucket_bytes))})
    group.destroy()


def _run_pair(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """One fresh sender/receiver process pair running every cycle; returns rank 0's timings."""
    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, q, args, backend, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=3600)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total-mb", type=float, default=1024.0, help="about this many MiB on the wire (bf16)")
    ap.add_argument("--bucket-mb", type=float, default=WeightSyncConfig.bucket_mb)
    ap.add_argument("--hidden", type=int, default=3584, help="layer shapes (default Qwen2.5-7B)")
    ap.add_argument("--ffn", type=int, default=18944)
    ap.add_argument("--repeats", type=int, default=9, help="A/B (and L/B) cycles per process pair")
    ap.add_argument("--runs", type=int, default=3,
                    help="fresh process pairs, their cycles pooled: on the 2-core VM a pair's median moves "
                         "by up to 10 %% from one pair to the next (thread placement, memory), not only "
                         "from cycle to cycle")
    ap.add_argument("--alone-mb", type=float, default=WeightSyncConfig.alone_mb,
                    help="tensors of at least this size already in bf16 are sent from their own memory "
                         "(0 = only tensors that fill a bucket)")
    ap.add_argument("--first-bucket-mb", type=float, default=WeightSyncConfig.first_bucket_mb,
                    help="the first bucket's size, doubled per bucket up to --bucket-mb (0 = no ramp)")
    ap.add_argument("--source-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--layout", choices=["views", "separate"], default="views",
                    help="the sender's weights: views of one buffer (Megatron's DDP param buffer) or one "
                         "allocation each")
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    args = ap.parse_args()
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"
    runs = [_run_pair(args, backend) for _ in range(args.runs)]
    res = dict(runs[0])
    res["times"] = {k: [t for r in runs for t in r["times"][k]] for k in runs[0]["times"]}
    gb = res["bytes"] / 1e9
    bw = {k: [gb / t for t in v] for k, v in res["times"].items()}
    print(f"backend={backend} bytes={res['bytes']} ({res['bytes'] / 2**20:.0f} MiB bf16) tensors={res['tensors']} "
          f"buckets={res['buckets']} bucket_mb={args.bucket_mb} alone_mb={args.alone_mb} "
          f"first_bucket_mb={args.first_bucket_mb} source={args.source_dtype} layout={args.layout} "
          f"repeats={args.repeats} runs={args.runs}")
    for i, (c, b) in enumerate(zip(bw["L"], bw["B_L"], strict=True)):
        print(f"load cycle {i}: bucketed+load {c:.3f} GB/s  raw {b:.3f} GB/s  ratio {c / b:.3f}")
    for i, (a, b) in enumerate(zip(bw["A"], bw["B"], strict=True)):
        print(f"cycle {i}: bucketed {a:.3f} GB/s  raw {b:.3f} GB/s  ratio {a / b:.3f}")
    med_a, med_b = statistics.median(bw["A"]), statistics.median(bw["B"])
    load_ratio = statistics.median(c / b for c, b in zip(bw["L"], bw["B_L"], strict=True))
    print(f"median bucketed {med_a:.3f} GB/s, raw broadcast {med_b:.3f} GB/s; bucketed+load "
          f"{statistics.median(bw['L']):.3f} GB/s (ratio to its raw cycles {load_ratio:.3f})")
    for label, n in (("Qwen2.5-7B", PARAMS_7B), ("Qwen2.5-32B", PARAMS_32B)):
        print(f"estimate {label} ({n:.3g} params, bf16 {2 * n / 1e9:.1f} GB): {2 * n / 1e9 / med_a:.1f} s at the "
              f"bucketed rate ({backend}, this link)")
    per_run = [statistics.median(b / a for a, b in zip(r["times"]["A"], r["times"]["B"], strict=True)) for r in runs]
    print("median ratio per run (fresh process pair each): " + " ".join(f"{x:.3f}" for x in per_run))
    print(f"median ratio bucketed/raw: {statistics.median(a / b for a, b in zip(bw['A'], bw['B'], strict=True)):.3f}")


if __name__ == "__main__":
    main()
