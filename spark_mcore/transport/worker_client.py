"""A rollout worker's end of the stream: a DEALER that connects to the trainer's endpoint, takes
prompt assignments and sends verified groups back until the trainer acknowledges them.

Delivery: a result stays in `unacked` until an `ack` names it. When the trainer answers with a
new session (it restarted) or the connection moved, every unacknowledged result is sent again;
the trainer keeps the first copy of each sample id. Results handed over together (`send_results`,
`send_parts`) go out in `results` messages of at most `batch_max_results` results and about
`batch_max_bytes` (never more than `max_message_bytes`: one result over it raises ResultTooLarge);
nothing waits for a batch to fill.
`send_results` converts the results' arrays at once, end to end (`protocol.results_tensors`), so a
batch of them is sent without another copy; results of `batch_alone_bytes` or more share a
message only that way (see StreamConfig). A message refused because the queue to the trainer
is full (high_water_mark) waits in `backlog` and goes out on a later `poll`, in order: a
result is never left unsent on a live connection. Heartbeats report what the worker holds, so
the trainer can re-issue prompts whose assignment was lost with a connection.
Not thread-safe: one thread calls `poll` / `send_result` (ZeroMQ sockets are single-threaded).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from typing import Any

import zmq

from spark_mcore.errors import UserError
from spark_mcore.transport.batch import encode_results, span
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.protocol import (
    ACK,
    ASSIGN,
    BYE,
    HEARTBEAT,
    HELLO,
    REFUSE,
    VERSION,
    WELCOME,
    WorkItem,
    WorkResult,
    item_from_wire,
    result_meta,
    results_tensors,
)
from spark_mcore.transport.records import _int, _str
from spark_mcore.transport.wire import WireError, decode, encode, readable, recv_frames, send_frames

logger = logging.getLogger(__name__)
_MAX_DRAIN = 1024  # messages handled per readiness check in `poll`
_META_BYTES = 512  # a result's header (its texts are a tensor frame), for the batch size estimate

Part = tuple[dict[str, Any], dict[str, Any]]  # (result_meta, result_tensors) of one result


class ResultTooLarge(UserError):
    """One result is over max_message_bytes: the trainer could never take it (ZeroMQ drops the
    connection of a peer that sends a larger frame, the endpoint drops a larger message), so the
    worker fails loudly instead of sending it again and again while the trainer waits."""


class LimitMismatch(UserError):
    """The worker takes smaller messages than the trainer may send it (transport.max_message_bytes
    differs between them): its socket would drop assignments, so it stops instead of idling."""


class WorkerRefused(UserError):
    """The trainer told this worker to stop (another live worker has its name)."""


class WorkerClient:
    """connect: the trainer's `tcp://HOST:PORT`; capacity: prompts this worker wants at once.
    server_public_key: the trainer's CURVE public key when it uses CURVE (Z85, 40 chars)."""

    def __init__(self, connect: str, worker: str | None = None, capacity: int = 8, heartbeat_s: float = 1.0,
                 server_public_key: str = "", high_water_mark: int = 256, max_message_bytes: int = 64 << 20,
                 batch_max_results: int = StreamConfig.batch_max_results,
                 batch_max_bytes: int = StreamConfig.batch_max_bytes,
                 batch_alone_bytes: int = StreamConfig.batch_alone_bytes) -> None:
        if not isinstance(connect, str) or not connect.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"--connect: expected the trainer's address like tcp://127.0.0.1:5555, got {connect!r}")
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if not 1 <= batch_max_results <= 256 or batch_max_bytes < 1 or batch_alone_bytes < 1:
            raise ValueError(f"batch_max_results: 1..256, batch_max_bytes and batch_alone_bytes: >= 1; got "
                             f"{batch_max_results}, {batch_max_bytes}, {batch_alone_bytes}")
        self.connect = connect
        self.batch_max_results = batch_max_results
        self.batch_max_bytes = min(batch_max_bytes, max_message_bytes)
        self.batch_alone_bytes = batch_alone_bytes
        self.max_message_bytes = max_message_bytes  # what this worker takes
        self.send_limit = max_message_bytes  # what the trainer takes, once its welcome says (never more than ours)
        self.worker = worker or f"worker-{os.getpid()}"
        self.incarnation = uuid.uuid4().hex[:12]
        self.capacity = capacity
        self.heartbeat_s = heartbeat_s
        self.policy_version = 0
        self.session = ""
        self.seen_seq = -1
        self.working: set[str] = set()
        self.unacked: dict[str, Part] = {}
        self.backlog: list[Part] = []  # results whose message the full queue refused, in order
        self.idle_s = 0.0  # the owner's generation time waiting for work so far (reported in heartbeats)
        self.resent = 0
        self.deferred = 0  # result messages that a full queue refused (their results wait in `backlog`)
        self.trainer_done = False  # the trainer said goodbye (its run ended)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
        self._sock.setsockopt(zmq.RCVHWM, high_water_mark)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if server_public_key:
            pub, sec = zmq.curve_keypair()
            self._sock.setsockopt_string(zmq.CURVE_SERVERKEY, server_public_key)
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, pub)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, sec)
        self._sock.connect(connect)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller_out = zmq.Poller()  # (while a backlog waits: also wakes when the queue has room)
        self._poller_out.register(self._sock, zmq.POLLIN | zmq.POLLOUT)
        self._last_report = 0.0
        self._closed = False
        self._report(HELLO)

    @property
    def held(self) -> set[str]:
        return self.working | set(self.unacked)

    def _report(self, kind: str) -> None:
        self._send(encode(kind, {"worker": self.worker, "incarnation": self.incarnation, "capacity": self.capacity,
                                 "held": sorted(self.held), "session": self.session, "seen_seq": self.seen_seq,
                                 "max_message_bytes": self.max_message_bytes, "idle_s": self.idle_s}))
        self._last_report = time.monotonic()

    def _send(self, frames: list[Any]) -> bool:
        try:
            send_frames(self._sock, frames)
            return True
        except zmq.Again:  # trainer unreachable and the queue is full: the report/resend retries
            return False

    def poll(self, timeout_ms: int = 100) -> list[WorkItem]:
        """Handles messages from the trainer for up to `timeout_ms` (returns early with new
        work) and sends a heartbeat when one is due. Returns newly assigned items."""
        new: list[WorkItem] = []
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            now = time.monotonic()
            if now - self._last_report >= self.heartbeat_s:
                self._report(HEARTBEAT)
            self._drain(new)
            if self.backlog:
                self._send_backlog()
            if new or now >= deadline:
                return new
            # rounded up: a zero wait would spin through the last millisecond before the deadline
            wait = max(1, min(math.ceil((deadline - now) * 1000), math.ceil(self.heartbeat_s * 1000)))
            # (persistent pollers: Socket.poll builds one per call)
            (self._poller_out if self.backlog else self._poller).poll(wait)

    def _send_backlog(self) -> None:
        """Sends what a full queue refused (still unacknowledged: a re-send may have delivered it)."""
        parts, self.backlog = self.backlog, []
        self._send_batched([p for p in parts if p[0]["sample_id"] in self.unacked])

    def _drain(self, new: list[WorkItem]) -> None:
        """Handles every queued message without waiting (ZMQ_EVENTS, not a poll, says whether
        one is queued); bounded so that heartbeats still go out under a burst."""
        for _ in range(_MAX_DRAIN):
            if not readable(self._sock):
                return
            try:
                self._handle(recv_frames(self._sock), new)
            except WireError as e:
                logger.warning("rollout worker %s: ignored a bad message from the trainer: %s", self.worker, e)

    def _handle(self, frames: list[Any], new: list[WorkItem]) -> None:
        msg_type, meta, _ = decode(frames)
        if msg_type == WELCOME:
            session = _str(meta.get("session"), "welcome.session")
            self.policy_version = _int(meta.get("policy_version"), "welcome.policy_version")
            self._adopt_limit(_int(meta.get("max_message_bytes"), "welcome.max_message_bytes"))
            if session != self.session:
                if self.session:
                    logger.warning("rollout worker %s: trainer session changed (%s -> %s): re-sending %d result(s)",
                                   self.worker, self.session, session, len(self.unacked))
                self.session, self.seen_seq, self.backlog = session, -1, []  # (all unacked go again)
                self.resent += self._send_batched(list(self.unacked.values()))
        elif msg_type == ASSIGN:
            seq = _int(meta.get("seq"), "assign.seq")
            items = meta.get("items")
            if not isinstance(items, list):
                raise WireError("assign.items: expected a list")
            parsed = [item_from_wire(d, f"assign.items[{i}]") for i, d in enumerate(items)]
            self.policy_version = max(self.policy_version, _int(meta.get("policy_version"), "assign.policy_version"))
            if meta.get("session") == self.session:
                self.seen_seq = max(self.seen_seq, seq)
            for item in parsed:  # (not `self.held`: that builds a set per lookup)
                if item.sample_id not in self.working and item.sample_id not in self.unacked:
                    self.working.add(item.sample_id)
                    new.append(item)
        elif msg_type == ACK:
            ids = meta.get("ids")
            if not isinstance(ids, list):
                raise WireError("ack.ids: expected a list")
            for sid in ids:
                self.unacked.pop(sid, None) if isinstance(sid, str) else None
        elif msg_type == BYE:
            self.trainer_done = True
        elif msg_type == REFUSE:
            reason = _str(meta.get("reason"), "refuse.reason")[:1000]
            raise WorkerRefused(f"worker {self.worker}: the trainer refused it: {reason}")
        elif msg_type == VERSION:
            self.policy_version = max(self.policy_version, _int(meta.get("policy_version"), "version.policy_version"))
        else:
            raise WireError(f"header.type: unexpected message type {msg_type!r} from the trainer")

    def _adopt_limit(self, trainer_limit: int) -> None:
        """Sends no message larger than the trainer takes; fails if the trainer may send us larger
        ones than we take (it sizes assignments to its own limit)."""
        if trainer_limit < 1:
            raise WireError(f"welcome.max_message_bytes: must be >= 1, got {trainer_limit}")
        if trainer_limit > self.max_message_bytes:
            raise LimitMismatch(
                f"worker {self.worker}: transport.max_message_bytes={self.max_message_bytes} is below the trainer's "
                f"({trainer_limit}): assignments up to the trainer's size would be dropped by this worker. Fix: "
                "start the worker with the trainer's transport settings (the same RUN.yaml and overrides)")
        if trainer_limit != self.send_limit:
            logger.info("rollout worker %s: the trainer takes messages of at most %d bytes; results are sized to it",
                        self.worker, trainer_limit)
        self.send_limit = trainer_limit
        self.batch_max_bytes = min(self.batch_max_bytes, trainer_limit)

    def send_result(self, result: WorkResult) -> None:
        """Sends a verified group; it is kept (and re-sent after a trainer restart) until acked."""
        self.send_results([result])

    def send_results(self, results: list[WorkResult]) -> None:
        """`send_result` for results that are all ready now: they share messages (see the module
        docstring)."""
        self.send_parts([(r.sample_id, result_meta(r, self.incarnation), t)
                         for r, t in zip(results, results_tensors(results), strict=True)])

    def send_parts(self, parts: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
        """`send_results` for results already split into (sample_id, `protocol.result_meta` with
        this client's incarnation, `protocol.result_tensors`)."""
        for sid, meta, tensors in parts:
            self.working.discard(sid)
            self.unacked[sid] = (meta, tensors)
        self._send_batched([(meta, tensors) for _, meta, tensors in parts])

    def _send_batched(self, parts: list[Part]) -> int:
        """Sends `parts` in order, in as few messages as the caps allow; returns how many of the
        results went out (those of a message that the full queue refused join `backlog`)."""
        sent, batch, size = 0, [], 0
        # large: the batch holds a result of batch_alone_bytes; chain: its token ids lie end to end
        # (the predictor of a copy-free join; `encode_results` checks every tensor)
        large, chain = False, True
        for meta, tensors in parts:
            nbytes = sum(t.nbytes for t in tensors.values()) + _META_BYTES
            big = nbytes >= self.batch_alone_bytes
            if batch:
                chain = chain and span([batch[-1][1]["token_ids"], tensors["token_ids"]]) is not None
                if (len(batch) >= self.batch_max_results or size + nbytes > self.batch_max_bytes
                        or tensors.keys() != batch[0][1].keys() or ((large or big) and not chain)):
                    sent += self._send_batch(batch)
                    batch, size, large, chain = [], 0, False, True
            batch.append((meta, tensors))
            size += nbytes
            large = large or big
        return sent + (self._send_batch(batch) if batch else 0)

    def _send_batch(self, batch: list[Part]) -> int:
        if self.backlog:  # behind results that wait for room: they go first (the order is kept)
            self.backlog += batch
            return 0
        frames = encode_results(batch)
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.send_limit:
            if len(batch) == 1:
                raise ResultTooLarge(
                    f"result '{batch[0][0]['sample_id']}' is {size} bytes, over the trainer's transport.max_message_bytes="
                    f"{self.send_limit}: the trainer would drop it. Fix: raise transport.max_message_bytes "
                    "(trainer and workers) or lower rollout.max_new_tokens")
            half = len(batch) // 2  # the estimate was short (long reward-task prompts in the header)
            return self._send_batch(batch[:half]) + self._send_batch(batch[half:])
        if not self._send(frames):
            self.deferred += 1
            self.backlog += batch
            return 0
        return len(batch)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._send(encode(BYE, {"worker": self.worker, "incarnation": self.incarnation}))
        self._sock.close(linger=200)
        self._ctx.term()


__all__ = ["WorkerClient", "ResultTooLarge", "LimitMismatch", "WorkerRefused"]
