"""Throughput and latency of the rollout stream against plain pyzmq PUSH/PULL of the same bytes.

    python tools/bench_stream.py [--reps 6] [--warmup 1] [--sizes 1024,8192] [--messages-mb 800] [--malloc-keep-mb 128]

A message is one verified group: 8 responses x L tokens with per-token log-probs and texts
(the frames `protocol.encode_result` makes: token ids, log-probs and texts as raw frames). Runs alternate A B A B (stream, then PUSH/PULL)
with a fresh producer process each, after one short unmeasured A B pair per size; the consumer
is this process.
  stream     a WorkerClient (DEALER) answers the assignments of a StreamEndpoint (ROUTER):
             credits, acknowledgements, re-send bookkeeping, and on the trainer side full
             validation of every result (`decode_arrays` + `decode_result(s)`) into arrays.
             The groups of one assignment are ready together, so the worker coalesces them
             as it would in a run (transport defaults: up to 32 results and ~4 MiB per
             `results` message: 32 groups per message at 1k tokens, 5 at 8k).
  push/pull  the producer sends the same frames over PUSH; the consumer only receives them and
             drops them (as the stream's consumer drops each group once validated; the
             producer reports its send times itself, so no message is parsed or kept).
Both producers start from arrays built once before the clock (the list -> array conversion of
engine output and the consumer's tensor -> list conversion into records are reported
separately: they cost the same whatever the transport), each from the arrays it would just have
converted, re-sent: PUSH/PULL from one group's, the stream from one message's groups converted at
once, as `WorkerClient.send_results` converts the groups that finished together
(`protocol.results_tensors`: each column end to end, so a `results` message of them is sent
without copying its members' arrays again). Both sources are as warm in cache as fresh engine
output would be. (Until 2026-11-30 the stream cycled through 64 groups, 46 MB at 8k tokens, read
from memory, while PUSH/PULL re-sent one cache-hot group: ~0.05-0.08 ms more producer CPU per
8k group for the stream than for the same bytes from cache.) Latency is send ->
accepted (CLOCK_MONOTONIC, system-wide), per message; the rate is groups over first send ->
last arrival.
Every process collects its garbage once before its clock starts: a fresh process's first full
collection (~0.1 s with torch imported) comes after so many allocations that it would land in
whichever side's run allocates more Python objects, a start-up cost a long-running worker or
trainer pays once.
Every process of both runs (consumer and producers) uses the allocator settings the trainer and
the rollout workers use (`transport.malloc_keep_mb`, spark_mcore/transport/malloc.py): glibc's
defaults fault fresh pages in for the receive buffers of every message, which costs both sides,
and the stream more (2026-12-01, 8k: 35 against 17-23 minor faults per group in the consumer; its
CPU per group 0.243 -> 0.167 ms with the settings, the baseline's 0.154 -> 0.117; the median
ratio of four interleaved runs each 0.84 without them, 0.95 with them: `--malloc-keep-mb 0`).
Each row also gives the CPU ms per group of producer and consumer (all their threads; the
producer's clock starts once its test arrays are built, which is not part of either stream): on a
shared machine the rate moves with other jobs, the CPU cost hardly does.
Prints one row per run, a summary per size, and as the last line the median ratio
(stream / push-pull groups per second) over all runs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from spark_mcore.transport.config import StreamConfig  # noqa: E402
from spark_mcore.transport.endpoint import StreamEndpoint  # noqa: E402
from spark_mcore.transport.malloc import keep_freed_memory  # noqa: E402
from spark_mcore.transport.protocol import (  # noqa: E402
    RESULT,
    WorkItem,
    WorkResult,
    result_meta,
    result_tensors,
    results_tensors,
)
from spark_mcore.transport.wire import encode  # noqa: E402
from spark_mcore.types import Completion, Prompt  # noqa: E402

N_RESPONSES = 8
# Groups that may be between producer and consumer: the stream's credits; PUSH/PULL gets the same
# count as SNDHWM + RCVHWM (plus the kernel's socket buffers, which only the baseline uses).
WINDOW = 64
KEEP_MB = StreamConfig().malloc_keep_mb  # the transport's default (module docstring)


def group(tokens: int, seed: int = 0) -> WorkResult:
    import random

    rng = random.Random(seed)
    comps = [Completion([rng.randrange(150_000) for _ in range(tokens)], "x" * (3 * tokens),
                        [-rng.random() * 3 for _ in range(tokens)]) for _ in range(N_RESPONSES)]
    return WorkResult("s", "bench", 0, [rng.randrange(150_000) for _ in range(200)], comps, [1.0] * N_RESPONSES)


def _frames(res: WorkResult, tensors: dict, sid: str, sent: float) -> list:
    res.sample_id, res.gen_s = sid, sent  # gen_s carries the send time through the stream
    return encode(RESULT, result_meta(res, "bench"), tensors)


# --- producers (child processes) -----------------------------------------------------------------


def _settled_cpu() -> float:
    """The producer's CPU clock once its test group is built (not part of the stream) and the
    import-time garbage is collected (see the module docstring)."""
    gc.collect()
    return time.process_time()


def groups_per_message(tokens: int) -> int:
    """How many groups a worker puts in one `results` message under the transport's batch caps."""
    cfg, nbytes = StreamConfig(), _message_bytes(tokens)
    return max(1, min(cfg.batch_max_results, cfg.batch_max_bytes // nbytes))


def produce_stream(endpoint: str, tokens: int, messages: int) -> tuple[None, float]:
    from spark_mcore.transport.worker_client import WorkerClient

    res = group(tokens)
    # the arrays of one message's groups converted at once, as `WorkerClient.send_results` converts
    # the groups that finished together (end to end: a `results` message of them needs no copy)
    batch = results_tensors([res] * groups_per_message(tokens))
    cpu0 = _settled_cpu()
    client = WorkerClient(endpoint, "bench", capacity=WINDOW, heartbeat_s=1.0, max_message_bytes=1 << 30)
    while not client.trainer_done:
        parts = []
        for j, item in enumerate(client.poll(5)):  # every assigned item is ready at once (no engine here)
            res.sample_id, res.gen_s = item.sample_id, time.monotonic()  # gen_s: when the group was ready
            parts.append((item.sample_id, result_meta(res, client.incarnation), batch[j % len(batch)]))
        if parts:
            client.send_parts(parts)  # (with the transport's default batch caps)
    client.close()
    return None, time.process_time() - cpu0


def produce_pushpull(endpoint: str, tokens: int, messages: int) -> tuple[list[float], float]:
    res = group(tokens)
    tensors = result_tensors(res)
    cpu0 = _settled_cpu()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, WINDOW // 2)  # with the PULL side's RCVHWM: the stream's window
    sock.connect(endpoint)
    sent = []
    for i in range(messages):
        sent.append(time.monotonic())
        sock.send_multipart(_frames(res, tensors, f"s{i}", sent[-1]), copy=False)
    sock.close(linger=-1)
    ctx.term()
    # the consumer reads the send times from here: it never has to parse (or keep) a message
    return sent, time.process_time() - cpu0


# --- consumers (this process) ----------------------------------------------------------------------


def _spawn(kind: str, endpoint: str, tokens: int, messages: int, keep_mb: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--produce", kind, "--endpoint", endpoint,
                             "--tokens", str(tokens), "--messages", str(messages), "--malloc-keep-mb", str(keep_mb)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)


def _cpu_ms(out: str, consumer_s: float, messages: int) -> dict:
    """CPU ms per group of producer and consumer (all threads, ZeroMQ's I/O thread included):
    unlike the rate, it hardly moves with what else runs on the machine. `out`: the producer's
    stdout (its CPU seconds on the last line)."""
    producer_s = float(out.strip().splitlines()[-1])
    return {"cpu_prod_ms": producer_s * 1e3 / messages, "cpu_cons_ms": consumer_s * 1e3 / messages}


def _summary(recv: list[float], sent: list[float], nbytes: int) -> dict:
    # rate over the whole pipeline: first send to last arrival (a consumer that falls behind
    # and drains a burst must not look fast)
    span = max(recv) - min(sent)
    lat = sorted((r - s) * 1e3 for r, s in zip(recv, sent, strict=True))
    n = len(recv)
    return {"groups_s": n / span, "mb_s": n * nbytes / span / 1e6, "p50_ms": lat[len(lat) // 2],
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def run_stream(tokens: int, messages: int, keep_mb: int = KEEP_MB) -> dict:
    ep = StreamEndpoint(StreamConfig(credits_per_worker=WINDOW, max_message_bytes=1 << 30, heartbeat_s=1.0,
                                     worker_timeout_s=60.0, high_water_mark=2 * WINDOW))
    ep.submit([WorkItem(f"s{i}", Prompt(f"p{i}", [{"role": "user", "content": "q"}], "1"), {"n": N_RESPONSES})
               for i in range(messages)])
    proc = _spawn("stream", ep.endpoint, tokens, messages, keep_mb)
    gc.collect()
    cpu0 = time.process_time()
    recv, sent = [], []
    try:
        while len(recv) < messages:
            for acc in ep.poll(100):
                recv.append(acc.received_at)  # when the endpoint accepted it (time.monotonic)
                sent.append(acc.frames.meta["gen_s"])
            if proc.poll() is not None and len(recv) < messages:
                raise RuntimeError("stream producer exited early")
    finally:
        cpu = time.process_time() - cpu0
        ep.close()  # says goodbye: the producer exits
        out, _ = proc.communicate(timeout=300)  # (reads its stdout while waiting: no pipe stall)
    return {**_summary(recv, sent, _message_bytes(tokens)), **_cpu_ms(out, cpu, messages)}


def run_pushpull(tokens: int, messages: int, keep_mb: int = KEEP_MB) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, WINDOW // 2)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    proc = _spawn("pushpull", endpoint, tokens, messages, keep_mb)
    gc.collect()
    cpu0 = time.process_time()
    recv = []
    try:
        for _ in range(messages):
            sock.recv_multipart(copy=False)  # received, then dropped: the baseline does no work
            recv.append(time.monotonic())
    finally:
        cpu = time.process_time() - cpu0
        out, _ = proc.communicate(timeout=300)
        sock.close(linger=0)
        ctx.term()
    sent = json.loads(out.strip().splitlines()[-2])  # the producer's send times, in order (one PUSH -> PULL pipe)
    return {**_summary(recv, sent, _message_bytes(tokens)), **_cpu_ms(out, cpu, messages)}


@functools.cache  # (every run asks; building a random 8k group takes ~0.2 s)
def _message_bytes(tokens: int) -> int:
    res = group(tokens)
    return sum(len(memoryview(f)) for f in encode(RESULT, result_meta(res, "bench"), result_tensors(res)))


def side_costs(tokens: int) -> dict:
    """Per group, ms: engine lists -> arrays (producer) and validated tensors -> records (consumer)."""
    from spark_mcore.transport.protocol import decode_result
    from spark_mcore.transport.wire import decode_arrays

    res = group(tokens)
    t0 = time.perf_counter()
    tensors = result_tensors(res)
    t1 = time.perf_counter()
    frames = [bytes(memoryview(f)) for f in encode(RESULT, result_meta(res, "bench"), tensors)]
    msg_type, meta, decoded = decode_arrays(frames)
    t2 = time.perf_counter()
    decode_result(meta, decoded).to_result()
    t3 = time.perf_counter()
    return {"lists_to_arrays_ms": (t1 - t0) * 1e3, "tensors_to_records_ms": (t3 - t2) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=6, help="A/B pairs per size")
    # the first stream run of a size was often the slowest of its pairs (heap growth to the
    # window's size, first use of the endpoint's code paths): one short A/B pair first, unmeasured
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured A/B pairs per size (a quarter of a run each)")
    ap.add_argument("--sizes", default="1024,8192", help="tokens per response")
    # 800 MB: runs of 0.3-1 s on the 2-core machine; at 200 MB an 8k run lasted ~0.1 s, and start-up
    # (connection, first allocations, the producer's first sends) weighed on the rate
    ap.add_argument("--messages-mb", type=float, default=800.0, help="MB sent per run (sets the message count)")
    ap.add_argument("--malloc-keep-mb", type=int, default=KEEP_MB,
                    help="transport.malloc_keep_mb for every process of both runs (0: glibc's defaults)")
    ap.add_argument("--produce", choices=["stream", "pushpull"], help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    keep_freed_memory(args.malloc_keep_mb)  # every process, both runs: as trainer and workers set it
    if args.produce:
        sent, cpu = (produce_stream if args.produce == "stream" else produce_pushpull)(args.endpoint, args.tokens, args.messages)
        print(json.dumps(sent), flush=True)  # send times (push/pull), read by run_pushpull
        print(cpu, flush=True)  # read by the consumer (_cpu_ms)
        return
    ratios: list[float] = []
    for tokens in [int(s) for s in args.sizes.split(",")]:
        size = _message_bytes(tokens)
        messages = max(20, int(args.messages_mb * 1e6 / size))
        print(f"# {N_RESPONSES} x {tokens} tokens + log-probs: {size / 1e6:.3f} MB per group, {messages} groups per run; "
              f"{json.dumps({k: round(v, 2) for k, v in side_costs(tokens).items()})}", flush=True)
        per_size, cpu_ratio = [], []
        for _ in range(args.warmup):  # not measured: the first runs of a process also pay its start-up
            run_stream(tokens, max(20, messages // 4), args.malloc_keep_mb)
            run_pushpull(tokens, max(20, messages // 4), args.malloc_keep_mb)
        for rep in range(args.reps):
            a = run_stream(tokens, messages, args.malloc_keep_mb)
            b = run_pushpull(tokens, messages, args.malloc_keep_mb)
            per_size.append(a["groups_s"] / b["groups_s"])
            cpu_ratio.append((b["cpu_prod_ms"] + b["cpu_cons_ms"]) / (a["cpu_prod_ms"] + a["cpu_cons_ms"]))
            for name, r in (("stream", a), ("push/pull", b)):
                print(f"{tokens:>5} rep {rep} {name:>9}: {r['groups_s']:8.1f} groups/s {r['mb_s']:8.1f} MB/s "
                      f"p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms  CPU ms/group producer "
                      f"{r['cpu_prod_ms']:.3f} consumer {r['cpu_cons_ms']:.3f}", flush=True)
        print(f"{tokens:>5} median ratio stream/push-pull: {statistics.median(per_size):.3f} (groups/s); "
              f"{statistics.median(cpu_ratio):.3f} (groups per CPU second, producer + consumer)", flush=True)
        ratios += per_size
    print(f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
