"""Peak extra memory and time of chunked `token_logprobs` vs the naive fp32 log_softmax.

    python tools/bench_logprobs.py                    # T=4096, V=151936, bf16 logits
    python tools/bench_logprobs.py --quick            # T=1024, V=32768
    python tools/bench_logprobs.py --tokens 2048 --vocab 65536 --repeats 3

"Extra" memory is the peak beyond what is allocated once the bf16 logits exist (the gradient
of the logits, which both variants must produce in forward+backward, counts as extra).
Every measurement runs in a fresh subprocess, interleaved ours / naive per repeat, so that
allocator caches of one run cannot hide memory of the next:
  * CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call;
  * CPU: the kernel's peak RSS (VmHWM) minus VmRSS before the call, after resetting the peak
    with /proc/self/clear_refs (falls back to ru_maxrss without that, which can only overstate).
Values are compared in the same run (same seed, same bf16 input): ours must agree with the
naive fp32 result within 1e-5 or, failing that, with float64 log-probs of 256 sampled tokens
(the naive fp32 sum is the less accurate one at large logits); the exit code is 1 otherwise.
Time is wall-clock of the measured call after a small warm-up. The last line is the median
forward-only ratio (ours / naive), e.g. `ratio_peak_extra_memory=0.013`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

Variant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MIB = 2**20
VALUE_TOL = 1e-5


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _ours(chunk_size: int | None) -> Variant:
    from spark_mcore.algo.logprobs import token_logprobs

    return lambda logits, labels: token_logprobs(logits, labels, chunk_size=chunk_size)


class PeakMeter(Protocol):
    """Measures the peak memory allocated between start() and extra_bytes()."""

    method: str

    def start(self) -> None: ...

    def extra_bytes(self) -> int: ...


class CudaPeak:
    method = "torch.cuda.max_memory_allocated"

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def extra_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class RssPeak:
    method = "VmHWM after clear_refs"

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS mark
        except OSError:
            self.method = "ru_maxrss (peak not resettable; includes setup)"
        self.base = _proc_status_kib("VmRSS") * 1024

    def extra_bytes(self) -> int:
        if self.method.startswith("VmHWM"):
            return _proc_status_kib("VmHWM") * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


METERS: dict[str, Callable[[], PeakMeter]] = {"cuda": CudaPeak, "cpu": RssPeak}


def _make_inputs(
    tokens: int, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 logits [1, T, V], labels [1, T], loss weights [1, T], deterministic.

    Random normal numbers for all T * V entries take ~10 s per process on a loaded 2-core
    machine, so 128 random rows are rolled along the vocab and rescaled per block instead:
    every block has a different distribution and no full fp32 temporary is ever created.
    """
    g = torch.Generator().manual_seed(1234)
    block = min(128, tokens)
    base = (torch.randn(block, vocab, generator=g) * 2).to(device=device, dtype=torch.bfloat16)
    logits = torch.empty(1, tokens, vocab, dtype=torch.bfloat16, device=device)
    for k, s in enumerate(range(0, tokens, block)):
        rows, shift, scale = min(block, tokens - s), k * 9973 % vocab, 0.75 + (k % 16) / 30
        # block k = base rolled by `shift` along the vocab, times `scale`, written in place
        torch.mul(base[:rows, shift:], scale, out=logits[0, s : s + rows, : vocab - shift])
        torch.mul(base[:rows, :shift], scale, out=logits[0, s : s + rows, vocab - shift :])
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    weights = torch.randn(1, tokens, generator=g).to(device)
    return logits, labels, weights


def _grad_rows(tokens: int) -> list[int]:
    return sorted({0, tokens // 2, tokens - 1})


def _warm_up(variant: Variant, logits: torch.Tensor, labels: torch.Tensor, backward: bool) -> None:
    """Runs the variant on 8 tokens so that one-time costs (lazily loaded kernel code pages,
    thread pools) are not counted as the variant's memory or time."""
    small = logits[:, :8].detach().clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        out = variant(small, labels[:, :8])
        if backward:
            out.sum().backward()


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line and saves outputs."""
    device = torch.device(args.device)
    variant = _ours(args.chunk_size) if args.variant == "ours" else _naive
    logits, labels, weights = _make_inputs(args.tokens, args.vocab, device)
    backward = args.mode == "fwd_bwd"
    _warm_up(variant, logits, labels, backward)
    logits.requires_grad_(backward)
    meter = METERS[device.type]()
    meter.start()
    t0 = time.perf_counter()
    if backward:
        logp = variant(logits, labels)
        (logp * weights).sum().backward()
    else:
        with torch.no_grad():
            logp = variant(logits, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    extra = meter.extra_bytes()
    saved = {"logp": logp.detach().float().cpu()}
    if backward:
        saved["grad_rows"] = logits.grad[0, _grad_rows(args.tokens)].float().cpu()
    torch.save(saved, args.out)
    print(json.dumps({"extra_bytes": extra, "seconds": seconds, "method": meter.method}))


def _run_one(args: argparse.Namespace, variant: str, mode: str, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant,
           "--mode", mode, "--out", str(out), "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--device", args.device]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant}/{mode} failed (rc {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _exact_logp(args: argparse.Namespace, rows: torch.Tensor) -> torch.Tensor:
    """float64 log-probs of the sampled token rows of the benchmark input (the ground truth)."""
    logits, labels, _ = _make_inputs(args.tokens, args.vocab, torch.device("cpu"))
    sub = logits[0, rows].double()
    return torch.log_softmax(sub, -1).gather(-1, labels[0, rows].unsqueeze(-1)).squeeze(-1)


def _check_values(args: argparse.Namespace, tmp: Path, mode: str) -> bool:
    """Prints max |ours - naive| (log-probs, sampled gradient rows) and both errors against
    float64 on 256 sampled tokens. Passes if ours is within VALUE_TOL of the naive fp32 result,
    or, failing that, of the float64 truth (the naive lane-wise fp32 sum over ~150k entries can
    itself be off by ~2e-5 for large logits)."""
    ours = torch.load(tmp / f"ours_{mode}.pt")
    naive = torch.load(tmp / f"naive_{mode}.pt")
    diff = (ours["logp"] - naive["logp"]).abs().max().item()
    rows = torch.linspace(0, args.tokens - 1, min(256, args.tokens)).long().unique()
    exact = _exact_logp(args, rows)
    ours_err = (ours["logp"][0, rows].double() - exact).abs().max().item()
    naive_err = (naive["logp"][0, rows].double() - exact).abs().max().item()
    text = f"{mode}: logp max|ours-naive|={diff:.3g} (tol {VALUE_TOL}) vs float64: ours {ours_err:.3g} naive {naive_err:.3g}"
    if "grad_rows" in ours:
        text += f" grad_rows max|ours-naive|={(ours['grad_rows'] - naive['grad_rows']).abs().max().item():.3g}"
    print(text, flush=True)
    return diff <= VALUE_TOL or ours_err <= VALUE_TOL


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=2, help="ours/naive pairs per mode")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default auto)")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd, fwd_bwd")
    p.add_argument("--quick", action="store_true", help="T=1024, V=32768")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["fwd", "fwd_bwd"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab = 1024, 32768
    modes = args.modes.split(",")
    if any(m not in ("fwd", "fwd_bwd") for m in modes) or args.repeats < 1 or args.tokens < 1:
        p.error("--modes takes fwd and/or fwd_bwd; --repeats and --tokens must be >= 1")
    args.mode_list = modes
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        worker(args)
        return 0
    print(f"T={args.tokens} V={args.vocab} bf16 logits ({args.tokens * args.vocab * 2 / MIB:.0f} MiB)"
          f" device={args.device} repeats={args.repeats}", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    ok = True
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for mode in args.mode_list:
            for rep in range(args.repeats):
                for variant in ("ours", "naive"):  # interleaved: A B A B
                    r = _run_one(args, variant, mode, tmp / f"{variant}_{mode}.pt")
                    results.setdefault((variant, mode), []).append(r)
                    print(f"[{mode} #{rep}] {variant:5s} extra={r['extra_bytes'] / MIB:9.1f} MiB "
                          f"time={r['seconds']:.2f} s ({r['method']})", flush=True)
            ok &= _check_values(args, tmp, mode)
            ours, naive = results[("ours", mode)], results[("naive", mode)]
            ratios[mode] = statistics.median(
                o["extra_bytes"] / max(n["extra_bytes"], 1) for o, n in zip(ours, naive, strict=True)
            )
            for name, runs in (("ours", ours), ("naive", naive)):
                print(f"{mode}: {name} median extra={statistics.median(r['extra_bytes'] for r in runs) / MIB:.1f}"
                      f" MiB median time={statistics.median(r['seconds'] for r in runs):.2f} s")
            print(f"ratio_peak_extra_memory_{mode}={ratios[mode]:.4f}", flush=True)
    if not ok:
        print("VALUE MISMATCH: chunked log-probs differ from the naive reference", file=sys.stderr)
    print(f"ratio_peak_extra_memory={ratios.get('fwd', next(iter(ratios.values()))):.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
