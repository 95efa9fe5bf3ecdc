"""Whole weight syncs into a live CPU twin server over HTTP + gloo: requests pipelined vs not.

    python tools/bench_weight_sync_http.py [--hidden 1024 --layers 8 --ffn 2816 --vocab 4096]
                                           [--bucket-mb 8] [--repeats 7]

One CPU twin of SGLang (spark_mcore.twin, its own process) holds a Qwen2 model in fp32;
this process is the trainer: `sync_once` (BucketSender) sends the same bf16 weights over the
real path (pause, flush,
begin_weight_update, one /update_weights_from_distributed + one gloo broadcast per bucket,
end_weight_update, flush, continue). Each bucket is loaded into the model by the server, under
its model lock, before it answers.
  A  weights.pipeline_requests=True (default): bucket k+1's request goes out once the server
     joined bucket k's broadcast and waits on the server while k loads.
  B  pipeline_requests=False: bucket k+1's request goes out after bucket k's answer.
--repeats cycles (A B, then B A). Small buckets (--bucket-mb) make the per-bucket cost show;
the last line is the median per-cycle ratio of B's time to A's (> 1: pipelining is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_mcore.sglang.client import SGLangClient, SGLangConfig, launch_servers  # noqa: E402
from spark_mcore.twin.server import TWIN_SERVER_COMMAND  # noqa: E402
from spark_mcore.weights.config import WeightSyncConfig  # noqa: E402
from spark_mcore.weights.server_calls import ServerCalls  # noqa: E402
from spark_mcore.weights.sync import BucketSender, SyncStats, sync_once  # noqa: E402


def _save_model(path: Path, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A random Qwen2 model saved for the server; returns its weights in bf16 (what a trainer sends)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}


def _sync_seconds(sender: BucketSender, calls: ServerCalls, weights: dict[str, torch.Tensor],
                  version: int, pipelined: bool, last: list[SyncStats]) -> float:
    sender.pipeline_requests = pipelined
    start = time.perf_counter()
    last[:] = [sync_once(sender, calls, sender.config, weights.items(), version)]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bucket-mb", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_wsync_http_") as tmp:
        weights = _save_model(Path(tmp) / "hf", args)
        servers = launch_servers(1, str(Path(tmp) / "hf"), 0, ["--threads", "1"], Path(tmp) / "logs",
                                 command=TWIN_SERVER_COMMAND)
        for s in servers:
            s.wait_healthy(300, "/health")
        sender = BucketSender(WeightSyncConfig(bucket_mb=args.bucket_mb, backend="gloo", alone_mb=0,
                                               first_bucket_mb=0))
        client = SGLangClient(servers, SGLangConfig())
        calls = ServerCalls(client)
        last: list[SyncStats] = []
        try:
            _sync_seconds(sender, calls, weights, 1, True, last)  # warm-up: group, buffers, server-side buffer
            _sync_seconds(sender, calls, weights, 2, False, last)
            times: dict[bool, list[float]] = {True: [], False: []}
            version = 3
            for cycle in range(args.repeats):
                for pipelined in ((True, False) if cycle % 2 == 0 else (False, True)):
                    times[pipelined].append(_sync_seconds(sender, calls, weights, version, pipelined, last))
                    version += 1
        finally:
            calls.close()
            client.close()
            sender.close()
            for s in servers:
                s.terminate(timeout_s=10)
    nbytes = sum(t.numel() * 2 for t in weights.values())
    buckets = last[0].buckets if last else 0
    print(f"model {sum(t.numel() for t in weights.values()) / 1e6:.0f}M params, {nbytes / 2**20:.0f} MiB bf16, "
          f"{buckets} buckets of <= {args.bucket_mb} MiB, repeats={args.repeats}")
    for i, (a, b) in enumerate(zip(times[True], times[False], strict=True)):
        print(f"cycle {i}: pipelined {a * 1e3:.0f} ms  sequential {b * 1e3:.0f} ms  ratio {b / a:.3f}")
    med_a, med_b = statistics.median(times[True]), statistics.median(times[False])
    print(f"median sync: pipelined {med_a * 1e3:.0f} ms ({(med_a / max(buckets, 1)) * 1e3:.2f} ms/bucket), "
          f"sequential {med_b * 1e3:.0f} ms ({(med_b / max(buckets, 1)) * 1e3:.2f} ms/bucket)")
    print(f"median ratio sequential/pipelined time: "
          f"{statistics.median(b / a for a, b in zip(times[True], times[False], strict=True)):.3f}")


if __name__ == "__main__":
    main()
