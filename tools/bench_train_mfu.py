"""Megatron trainer step throughput and MFU on one GPU: Qwen2.5-0.5B / 1.5B shapes, bf16, seq 4096.

Each implementation builds a MegatronActor (DDP, Megatron optimizer, forward-backward schedule)
and runs next-token steps on random tokens; implementations alternate step by step (A B A B)
after warm-up, and the median step time gives tokens/s and MFU:

    MFU = 3 x forward model FLOPs per token (spark_mcore.plan) x tokens/s / peak bf16 FLOP/s

Implementations: local-sdpa (megatron local spec, torch SDPA core attention), local (megatron's
DotProductAttention: materialises [b, h, s, s], slow and memory-hungry at 4096), te (Transformer
Engine spec; skipped when TE does not import). Target: >= 40 % MFU for the 1.5B shape on one
H100/H200. Without CUDA it says so and exits 0.

    python tools/bench_train_mfu.py --shapes 1.5b --impls local-sdpa,te --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SHAPES = {  # (hidden, layers, heads, kv heads, ffn, vocab): Qwen2.5-0.5B / 1.5B, tied embeddings
    "0.5b": (896, 24, 14, 2, 4864, 151936),
    "1.5b": (1536, 28, 12, 2, 8960, 151936),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def _peak(name: str, given: float | None) -> float:
    if given:
        return given
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16 TFLOP/s)")


def _actor(shape: str, impl: str, pstate: object, micro_batch: int, dtype: str = "bf16") -> object:
    from spark_mcore.algo.config import AlgoConfig
    from spark_mcore.models.config import ModelConfig
    from spark_mcore.trainer.actor import MegatronActor
    from spark_mcore.trainer.config import TrainerConfig

    h, layers, heads, kv, ffn, vocab = SHAPES[shape]
    model = ModelConfig(hidden_size=h, num_layers=layers, num_attention_heads=heads, num_query_groups=kv,
                        ffn_hidden_size=ffn, max_position_embeddings=32768, dtype=dtype,  # type: ignore[arg-type]
                        transformer_impl="transformer_engine" if impl == "te" else "local",
                        attention="megatron" if impl == "local" else "sdpa", rope_theta=1e6)
    actor = MegatronActor(model, TrainerConfig(micro_batch_size=micro_batch, lr=1e-5, warmup_ratio=0.0),
                          AlgoConfig(kl_coef=0.0), pstate, vocab)
    actor.setup_optimizer(1e-5, 1000, 0)
    return actor


def _batch(vocab: int, rows: int, seq: int) -> object:
    from spark_mcore.types import TrainBatch

    tokens = torch.randint(1, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, seq)
    mask[:, 0] = 0
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=torch.zeros(rows))


def _timed_step(actor: object, batch: object) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    actor.sft_step(batch)  # type: ignore[attr-defined]
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _flops_per_token(shape: str, seq: int) -> float:
    from spark_mcore.plan.shapes import ModelShape

    h, layers, heads, kv, ffn, vocab = SHAPES[shape]
    from spark_mcore.plan.estimate import forward_flops_per_token

    return 3 * forward_flops_per_token(ModelShape(shape, h, layers, heads, kv, ffn, vocab, tied=True), seq)


def run(args: argparse.Namespace) -> list[str]:
    from spark_mcore.config import accel
    from spark_mcore.distributed.config import ParallelConfig
    from spark_mcore.distributed.parallel import init_distributed

    peak = _peak(torch.cuda.get_device_name(0), args.peak_tflops) * 1e12
    pstate = init_distributed(ParallelConfig(), seed=1)
    impls = [i for i in args.impls.split(",") if i != "te" or accel.te_available()]
    lines = []
    for shape in args.shapes.split(","):
        actors = {impl: _actor(shape, impl, pstate, args.micro_batch, args.dtype) for impl in impls}
        batch = _batch(SHAPES[shape][5], args.micro_batch * args.micro_batches, args.seq)
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for step in range(args.warmup + args.steps):
            for impl in impls:  # A B A B
                t = _timed_step(actors[impl], batch)
                if step >= args.warmup:
                    times[impl].append(t)
        tokens = args.micro_batch * args.micro_batches * args.seq
        for impl in impls:
            med = statistics.median(times[impl])
            mfu = _flops_per_token(shape, args.seq) * tokens / med / peak
            mem = torch.cuda.max_memory_allocated() / 2**30
            lines.append(f"{shape} {impl:<10} step {med * 1e3:8.1f} ms  {tokens / med:10.0f} tokens/s  "
                         f"MFU {mfu:.3f}  (max mem {mem:.1f} GiB)")
            print(lines[-1], flush=True)
        del actors
        torch.cuda.empty_cache()
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--impls", default="local-sdpa,te", help="local-sdpa, local, te (comma-separated)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the GPU name)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_train_mfu: needs a CUDA GPU; nothing to measure on this machine")
        return 0
    lines = run(args)
    print(lines[-1] if lines else "no implementation ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
