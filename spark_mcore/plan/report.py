"""`spark-mcore plan`: arguments, the chosen or suggested layout, and its printed breakdown."""

from __future__ import annotations

import argparse

from spark_mcore.config.loader import ConfigError
from spark_mcore.plan import estimate as est
from spark_mcore.plan.shapes import PRESETS, ModelShape, resolve_shape

GIB = est.GIB


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in model shape")
    src.add_argument("--hf-config", help="an HF config.json (or its directory) instead of a preset")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpus", type=int, required=True, help="all GPUs: trainer + SGLang (disjoint)")
    hw.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    hw.add_argument("--usable", type=float, default=0.9, help="share of GPU memory a layout may use")
    hw.add_argument("--gpus-per-node", type=int, default=8)
    hw.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    hw.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    hw.add_argument("--link-gbps", type=float, default=25.0, help="weight-sync link, GB/s")
    lay = p.add_argument_group("layout (omit tp/pp to get suggestions)")
    lay.add_argument("--tp", type=int)
    lay.add_argument("--pp", type=int)
    lay.add_argument("--cp", type=int, default=1)
    lay.add_argument("--rollout-gpus", type=int, help="GPUs for SGLang servers (default: half of --gpus)")
    lay.add_argument("--server-tp", type=int, help="GPUs per SGLang server (default: smallest that fits)")
    lay.add_argument("--no-distributed-optimizer", action="store_true")
    lay.add_argument("--recompute", action="store_true", help="full activation recompute")
    wl = p.add_argument_group("workload (SPARK paper defaults)")
    wl.add_argument("--prompts", type=int, default=64)
    wl.add_argument("--n", type=int, default=8)
    wl.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens incl. image tokens")
    wl.add_argument("--new-tokens", type=int, default=1024)
    wl.add_argument("--micro-tokens", type=int, default=0, help="tokens per micro-batch (0: one sequence)")
    wl.add_argument("--no-reference", action="store_true", help="no KL term, no reference copy")


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f} GiB"


def describe(shape: ModelShape, lay: est.Layout, hw: est.Hardware, work: est.Workload) -> list[str]:
    """The memory / time breakdown of one layout as printable lines."""
    mem = est.memory_breakdown(shape, lay, work)
    roll = est.rollout_memory(shape, lay, hw, work)
    budget = hw.gpu_mem_gib * GIB * hw.usable
    lines = [f"layout: {lay.name()}  (trainer {lay.trainer_gpus} GPUs, SGLang {lay.rollout_gpus} GPUs)",
             "trainer memory per GPU (fuller pipeline stage):"]
    lines += [f"  {k:<12}{_gib(v)}" for k, v in mem.items() if k != "total"]
    verdict = "fits" if mem["total"] <= budget else "DOES NOT FIT"
    lines.append(f"  {'total':<12}{_gib(mem['total'])}  of {budget / GIB:.1f} GiB usable: {verdict}")
    lines += ["SGLang server GPU:",
              f"  weights     {_gib(roll['weights'])}",
              f"  KV cache    {roll['kv_bytes_per_token'] / 1024:.1f} KiB/token per GPU, pool {_gib(roll['kv_pool'])}",
              f"  capacity    {roll['capacity_tokens']:,} tokens on all servers; a step needs "
              f"{roll['step_tokens']:,} ({roll['waves']} wave(s))"]
    flops = est.step_flops(shape, work)
    lines += [f"step: {flops:.3e} model FLOPs (5 forwards: train fwd+bwd, old and reference log-probs)",
              f"  trainer time {est.step_seconds(shape, lay, hw, work):.1f} s at MFU {hw.mfu:.0%} of "
              f"{hw.peak_tflops:.0f} TFLOP/s x {lay.trainer_gpus} GPUs",
              f"  weight sync {est.sync_seconds(shape, lay, hw):.2f} s "
              f"({2 * shape.total_params() / 1e9:.1f} GB bf16 at {hw.link_gbps:g} GB/s, PP stages in parallel)"]
    return lines


def _objects(args: argparse.Namespace) -> tuple[ModelShape, est.Hardware, est.Workload]:
    shape = resolve_shape(args.preset, args.hf_config)
    hw = est.Hardware(args.gpu_mem, args.usable, args.peak_tflops, args.mfu, args.link_gbps, args.gpus_per_node)
    work = est.Workload(args.prompts, args.n, args.prompt_len, args.new_tokens, args.micro_tokens,
                        not args.no_reference)
    return shape, hw, work


def _given_layout(args: argparse.Namespace, shape: ModelShape, hw: est.Hardware) -> est.Layout:
    rollout = args.rollout_gpus if args.rollout_gpus is not None else args.gpus // 2
    server_tp = args.server_tp or next(
        (t for t in (1, 2, 4, 8) if t <= rollout and 2 * shape.total_params() / t <= 0.5 * hw.gpu_mem_gib * GIB), 8)
    lay = est.Layout(args.tp or 1, args.pp or 1, args.cp, args.gpus - rollout, rollout, server_tp,
                     not args.no_distributed_optimizer, args.recompute)
    problem = est.check_layout(shape, lay)
    if problem:
        raise ConfigError(f"layout {lay.name()}: {problem}")
    return lay


def run_plan(args: argparse.Namespace) -> int:
    shape, hw, work = _objects(args)
    print(f"model {shape.name}: {shape.total_params() / 1e9:.2f}B parameters "
          f"({shape.vision_params() / 1e9:.2f}B vision), {shape.layers} layers, hidden {shape.hidden}")
    print(f"step: {work.prompts} prompts x n={work.n} x {work.seq_len} tokens = {work.step_tokens:,} tokens")
    if args.tp or args.pp:
        for line in describe(shape, _given_layout(args, shape, hw), hw, work):
            print(line)
        return 0
    found = est.smallest_feasible(shape, args.gpus, hw, work, args.rollout_gpus, args.cp,
                                  not args.no_distributed_optimizer)
    if not found:
        least = est.min_gpus(shape, hw, work)
        hint = f"the smallest fit is {least.trainer_gpus + least.rollout_gpus} GPUs: {least.name()}" if least \
            else "none up to 256 GPUs"
        print(f"no layout fits {args.gpus} x {args.gpu_mem:g} GiB GPUs; {hint}")
        return 1
    print("smallest feasible layouts:")
    for lay in found:
        print(f"  {lay.name()}  ({est.memory_breakdown(shape, lay, work)['total'] / GIB:.1f} GiB per trainer GPU)")
    for line in describe(shape, found[0], hw, work):
        print(line)
    return 0
