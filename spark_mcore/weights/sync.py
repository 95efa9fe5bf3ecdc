"""Trainer side of the distributed weight sync: buckets -> one broadcast each -> rollout servers.

Per bucket the sender (rank 0 of the weight-update group) posts
/update_weights_from_distributed to every server WITHOUT waiting (the server answers only
after it has received and loaded the bucket) and broadcasts the flat bucket at the same time.
While bucket k is on the wire, bucket k+1 is gathered and packed into the second buffer.

Ordering: a server must post its receives in the sender's order, and it serves concurrent
HTTP requests in no guaranteed order, so request k+1 may only be sent once every server is
inside request k. Broadcast k completing on the sender proves that: gloo sends a buffer only
after the peer posted the matching receive, and an NCCL broadcast finishes only when every
rank joined. So request k+1 (and its broadcast) go out as soon as broadcast k is done, without
waiting for k's answer: it queues behind k (SGLang holds its model-update lock for the whole
request; the CPU twin its model lock) and starts the moment k's weights are loaded, with no
HTTP round trip between buckets. k's answer is collected right after, so a failed bucket is
still reported before the next one is sent. `WeightSyncConfig.pipeline_requests=False` waits
for k's answer before sending k+1 (servers that do not queue updates in arrival order).

A full sync (MegatronWeightSync.sync, or sync_once from one process):
pause generation -> flush cache -> begin_weight_update -> buckets -> end_weight_update ->
flush cache -> continue generation; the policy version travels as `weight_version` with every
bucket, and the servers stamp it on every sample they generate.

Protocol differences worth knowing (SGLang 0.5.23, checked in tests/unit/test_weights_sync.py):
  * load_format="flattened_bucket" (default): one broadcast per bucket; the body's
    names/dtypes/shapes describe the tensors inside the bucket in order; the receiver rebuilds
    them from the contiguous layout of `bucket.py`. The CPU twin speaks exactly this.
  * load_format="per_tensor": SGLang's original protocol, one broadcast per tensor of the
    bucket (same HTTP body without load_format) - for servers that lack flattened_bucket.
  * SGLang 0.5.23 rejects updates outside /begin_weight_update ... /end_weight_update;
    `WeightSyncConfig.weight_update_session=False` skips them for older servers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from spark_mcore.sglang import payloads as P
from spark_mcore.sglang.client import PendingCalls, ServerHandle, SGLangClient, SGLangError
from spark_mcore.weights.addresses import sender_address, stage_port
from spark_mcore.weights.bucket import WIRE_DTYPES, BucketHeader, BufferRing, iter_buckets, unpack_bucket
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.groups import (
    WeightUpdateGroup,
    create_master_store,
    join_weight_update_group,
    resolve_backend,
)
from spark_mcore.weights.nccl_check import explain_group_failure, log_trainer_nccl
from spark_mcore.weights.server_calls import ServerCalls, distributed_update_body

logger = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the server (with its log tail) or the cause."""


@dataclass
class SyncStats:
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


@dataclass
class _InFlight:
    pending: PendingCalls
    futures: list[tuple[ServerHandle, Future]]
    works: list[Any]
    flat: torch.Tensor  # kept alive until the broadcast is done


class BucketSender:
    """Rank 0 of one weight-update group (one per pipeline stage)."""

    def __init__(self, config: WeightSyncConfig, group_name: str | None = None, stage: int = 0) -> None:
        """stage: this sender's pipeline stage (its address and a fixed port are per stage)."""
        self.config = config
        self.group_name = group_name or config.group_name
        self.stage = stage
        self.group: WeightUpdateGroup | None = None
        self.broken: str | None = None  # set when a bucket failed mid-broadcast
        self.wire_dtype = WIRE_DTYPES[config.wire_dtype]
        self.ring: BufferRing | None = None
        self.client: SGLangClient | None = None
        self.pipeline_requests = config.pipeline_requests is True

    def connect(self, client: SGLangClient) -> None:
        """Form the group with every server (their ranks from weight_group_layout).

        A server keeps a group until told otherwise, and refuses to create a name it holds: after
        a trainer restart against long-lived servers (sglang.urls) the old group is still there,
        so it is destroyed first (a server without it just says so)."""
        if self.group is not None:
            return
        cfg = self.config
        backend = resolve_backend(cfg.backend)
        self.pipeline_requests = cfg.resolved_pipeline_requests(backend)
        trainer_nccl = log_trainer_nccl(backend)
        client.destroy_weights_update_group(self.group_name)
        world = 1 + len(client.handles) * client.config.gpus_per_server
        address = sender_address(cfg.master_address)
        store = create_master_store(address, stage_port(cfg.master_port, self.stage), world, cfg.timeout_s)
        pending = client.init_weights_update_group(address, store.port, self.group_name, backend)
        try:
            self.group = join_weight_update_group(address, store.port, 0, world, self.group_name,
                                                  backend, cfg.timeout_s, store=store)
            pending.wait()
        except BaseException as e:
            if self.group is None:
                _wait_quietly(pending)  # a server-side error explains the failure better
            if isinstance(e, Exception):
                raise WeightSyncError(explain_group_failure(e, backend, trainer_nccl)) from e
            raise
        self.client = client
        logger.info("weight-update group %s formed at %s:%d (%d ranks, %s)", self.group_name, address, store.port,
                    world, backend)

    def send(self, calls: ServerCalls, named: Iterable[tuple[str, torch.Tensor]], version: int | None) -> SyncStats:
        """Bucket `named` and push every bucket to all live servers; returns what was sent."""
        if self.group is None:
            raise WeightSyncError("BucketSender.send before connect(): form the weight-update group first")
        if self.broken:
            raise WeightSyncError(f"weight-update group {self.group_name!r} is out of step after an earlier failure "
                                  f"({self.broken}); restart the rollout servers and the sender (close + connect)")
        flattened = self.config.load_format == "flattened_bucket"
        stats, start = SyncStats(), time.perf_counter()
        previous: _InFlight | None = None
        ring = self.ring or BufferRing(self.config.bucket_bytes, num_buffers=2)
        if self.config.keep_buffers:
            self.ring = ring
        # Advancing the generator packs (and TP-gathers) bucket k+1 while bucket k is on the wire.
        for header, flat in iter_buckets(named, self.config.bucket_bytes, self.wire_dtype, self.group.device,
                                         ring=ring, alone_bytes=self.config.alone_bytes,
                                         first_bucket_bytes=self.config.first_bucket_bytes):
            if previous is not None:
                self._await_broadcast(previous)  # every server is now inside request k (module doc)
                if not self.pipeline_requests:
                    self._await_answers(previous, later=None)
            current = self._start(calls, header, flat, version, flattened)
            if previous is not None and self.pipeline_requests:
                self._await_answers(previous, later=current)
            previous = current
            stats.buckets += 1
            stats.tensors += len(header.tensors)
            stats.bytes += header.nbytes
        if previous is not None:
            self._await_broadcast(previous)
            self._await_answers(previous, later=None)
        stats.seconds = time.perf_counter() - start
        return stats

    def _start(self, calls: ServerCalls, header: BucketHeader, flat: torch.Tensor, version: int | None,
               flattened: bool) -> _InFlight:
        """Post one bucket's update request to every live server and start its broadcast(s)."""
        assert self.group is not None
        body = distributed_update_body(header, self.group_name, version, flattened)
        pending, futures = calls.post("/update_weights_from_distributed", lambda k, h, b=body: b, retry=False)
        parts = [flat] if flattened else [t for _, t in unpack_bucket(flat, header)]
        return _InFlight(pending, futures, [self.group.broadcast(p, async_op=True) for p in parts], flat)

    def _await_broadcast(self, item: _InFlight) -> None:
        """Wait for a bucket's broadcast; a server's error answer ends the wait early (a
        broadcast the server never joined would otherwise block until the timeout)."""
        failure = self._wait_broadcast(item)
        if failure is not None:
            handle, error = failure
            self._settle(item, f"{type(error).__name__} from {handle.describe()} during a bucket broadcast")
            raise WeightSyncError(f"weight update failed on {handle.describe()}: {error}\nlog tail:\n"
                                  f"{handle.log_tail()}") from error
        for w in item.works:
            w.wait()  # NCCL: orders the current stream after the broadcast (buffer reuse)

    def _await_answers(self, item: _InFlight, later: _InFlight | None) -> None:
        """Collect a bucket's HTTP answers; on an error, `later` (the next bucket, already on its
        way) is given a moment to finish so the group is left in step when it can be."""
        try:
            item.pending.wait(timeout_s=self.config.timeout_s)
        except SGLangError as e:
            if later is not None:
                self._settle(later, "a server failed a bucket while the next one was already on its way")
            raise WeightSyncError(f"weight update failed on a rollout server: {e}") from e

    def _settle(self, item: _InFlight, reason: str) -> None:
        """After a failure: a server that received the bucket answers after the broadcast, so
        wait briefly; a broadcast still open then was never joined and the group is out of step."""
        deadline = time.monotonic() + 2.0
        while not all(w.is_completed() for w in item.works) and time.monotonic() < deadline:
            time.sleep(0.001)
        if not all(w.is_completed() for w in item.works):
            self.broken = reason

    def _wait_broadcast(self, item: _InFlight) -> tuple[ServerHandle, BaseException] | None:
        """Block until the broadcast is done or a server's answer is an error (returned)."""
        wake = threading.Event()
        failures: list[tuple[ServerHandle, BaseException]] = []

        def on_answer(handle: ServerHandle, fut: Future) -> None:
            if fut.exception() is not None:
                failures.append((handle, fut.exception()))
                wake.set()

        for handle, fut in item.futures:
            fut.add_done_callback(lambda f, h=handle: on_answer(h, f))
        if self.group is not None and self.group.backend == "gloo":
            _when_done(item.works, wake.set)
            done = wake.wait(self.config.timeout_s)
        else:  # NCCL: completion is a GPU event; poll it (the CPU is idle meanwhile)
            deadline = time.monotonic() + self.config.timeout_s
            while not (done := all(w.is_completed() for w in item.works)) and not wake.is_set() \
                    and time.monotonic() < deadline:
                time.sleep(0.0002)
        if failures:
            return failures[0]
        if not done and not all(w.is_completed() for w in item.works):
            raise WeightSyncError(f"a weight bucket broadcast did not finish in {self.config.timeout_s}s")
        return None

    def close(self) -> None:
        """Leave the group here and ask the servers to drop it too, so that the name can be
        created again (best effort: a dead server cannot answer)."""
        self.ring = None
        if self.group is not None:
            self.group.destroy()
            self.group = None
        if self.client is not None:
            try:
                self.client.destroy_weights_update_group(self.group_name)
            except SGLangError as e:
                logger.warning("weight sync: could not destroy group %s on the servers: %s", self.group_name, e)
            self.client = None


def _wait_quietly(pending: PendingCalls) -> None:
    try:
        pending.wait(timeout_s=5)
    except Exception as e:  # noqa: BLE001 - the server's reason, logged next to the trainer's
        logger.error("weight-update group: a server failed to join: %s", e)


def _when_done(works: list[Any], callback: Callable[[], None]) -> None:
    """Call `callback` once every work is done (gloo). The works' futures call it from gloo's
    own thread as the last one completes: no thread per bucket and one wake-up fewer between
    buckets, which shows on a busy CPU. Works without futures are waited on by a daemon thread
    (gloo's wait blocks the calling thread)."""
    futures = [w.get_future() for w in works if hasattr(w, "get_future")]
    if works and len(futures) == len(works):
        torch.futures.collect_all(futures).add_done_callback(lambda _: callback())
        return
    threading.Thread(target=lambda: ([w.wait() for w in works], callback()), daemon=True,
                     name="weight-bucket-wait").start()


def _flush_body(calls: ServerCalls) -> dict[str, Any]:
    """Right after a pause the servers may still be finishing requests: SGLang answers a bare
    /flush_cache with 400 until idle, so the request carries sglang.flush_timeout_s."""
    return P.build_flush_cache_payload(calls.client.config.flush_timeout_s)


def _control(calls: ServerCalls, path: str, body: dict[str, Any] | None) -> None:
    try:
        calls.call(path, body)
    except SGLangError as e:
        raise WeightSyncError(f"{path} failed during a weight sync: {e}") from e


def begin_update(calls: ServerCalls, config: WeightSyncConfig, pause: bool = True) -> None:
    """pause (optional) -> flush -> begin_weight_update (when configured)."""
    if pause:
        _control(calls, "/pause_generation", P.build_pause_generation_payload(config.pause_mode))
    _control(calls, "/flush_cache", _flush_body(calls))
    if config.weight_update_session:
        _control(calls, "/begin_weight_update", {})


def end_update(calls: ServerCalls, config: WeightSyncConfig, resume: bool = True) -> None:
    """end_weight_update (when configured) -> flush -> continue (optional)."""
    try:
        if config.weight_update_session:
            _control(calls, "/end_weight_update", {})
        _control(calls, "/flush_cache", _flush_body(calls))
    finally:
        if resume:
            _control(calls, "/continue_generation", P.build_continue_generation_payload())


def end_update_after_failure(calls: ServerCalls, config: WeightSyncConfig, resume: bool = True) -> None:
    """Best-effort end_update after a failed send (the servers' session must not stay open);
    its own errors are logged, so the caller re-raises the original failure."""
    try:
        end_update(calls, config, resume)
    except Exception as e:  # noqa: BLE001
        logger.warning("closing the weight-update session after a failed sync also failed: %s", e)


def sync_once(sender: BucketSender, calls: ServerCalls, config: WeightSyncConfig,
              named: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
    """A whole sync from one process that already holds HF-named full tensors (one stage, no
    TP gather): pause -> flush -> session -> buckets -> session end -> flush -> continue.
    MegatronWeightSync does the same around its stages' turns; tests and benchmarks use this."""
    if sender.group is None:
        sender.connect(calls.client)
    begin_update(calls, config, pause=True)
    try:
        stats = sender.send(calls, named, version)
    except BaseException:
        end_update_after_failure(calls, config, resume=True)
        raise
    end_update(calls, config, resume=True)
    return stats


__all__ = ["WeightSyncError", "SyncStats", "BucketSender", "sync_once", "begin_update", "end_update",
           "end_update_after_failure"]
