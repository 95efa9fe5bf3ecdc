"""The trainer's end of the rollout stream: a ZeroMQ ROUTER that hands prompts to rollout workers
and takes their verified groups back, each exactly once.

Bookkeeping (all in this process, single-threaded, driven by `poll`):
  items      sample_id -> WorkItem for every submitted prompt whose group has not been accepted
  pending    sample ids waiting for a worker (re-assigned ones go to the front)
  owner      sample_id -> worker it is assigned to
  done       sample ids already accepted: a second result for one (a re-send, or a re-assigned
             prompt that both workers finished) is acknowledged and dropped
Credits: a worker holds at most min(its capacity, transport.credits_per_worker) prompts (assigned,
generating, or finished but not yet acknowledged).
Re-assignment: a worker silent for transport.worker_timeout_s, a worker that restarted (new
incarnation), a worker whose report no longer lists a prompt it was sent, and a result too stale
to train on all send the prompt back to `pending`; the log names the worker.
Bad input: every message is validated (wire format, fields, dtypes, sizes); a bad one is logged
with its sender (rate-limited per sender) and dropped, and the stream goes on. A `results`
message (several results that were ready together) with broken framing is dropped whole; a bad
member of a sound one is dropped alone (logged as `results[i]`), the others are taken.
ZeroMQ refuses frames over transport.max_message_bytes, and the endpoint drops a message whose
frames add up to more; an assignment is split to fit that limit (a worker's socket has the same
one), and a prompt over it alone stops the run (PromptTooLarge). Nothing is unpickled.
Full queues: a message to a worker whose queue is full (transport.high_water_mark) is not sent
and not lost: the ROUTER is mandatory (it refuses instead of silently dropping), an assignment's
prompts go back to `pending`, acks stay queued, and a worker that missed a policy version hears
it again; all are retried on the next `poll`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from spark_mcore.errors import UserError
from spark_mcore.transport.batch import decode_results
from spark_mcore.transport.config import StreamConfig, check_bind_address
from spark_mcore.transport.protocol import (
    ACK,
    ASSIGN,
    BYE,
    HEARTBEAT,
    HELLO,
    REFUSE,
    RESULT,
    RESULTS,
    VERSION,
    WELCOME,
    PeerReport,
    ResultFrames,
    WorkItem,
    check_peer,
    decode_result,
    item_to_wire,
)
from spark_mcore.transport.wire import WireError, decode_arrays, encode, readable, recv_frames, send_frames

logger = logging.getLogger(__name__)
_LOG_FIRST_BAD = 5  # per sender, then every _LOG_EVERY_BAD-th
ACK_DELAY_S = 0.02  # the longest an accepted result waits for its ack (see `_flush_acks`)


class PromptTooLarge(UserError):
    """One work item is over transport.max_message_bytes on the wire: no worker could take it
    (ZeroMQ drops the connection of a peer that sends a larger frame, and the worker reconnects)."""


class StreamStalled(UserError):
    """No result arrived for transport.stall_timeout_s while the trainer waited; names the workers
    and the fix (a user-side failure: workers missing, dead or misconfigured; exit code 2)."""


@dataclass
class _Worker:
    name: str
    incarnation: str
    identity: bytes
    capacity: int
    last_seen: float
    in_flight: dict[str, int] = field(default_factory=dict)  # sample_id -> seq of the assign that sent it
    seq: int = -1  # last assign seq sent to this incarnation
    version: int = -1  # last policy version this worker was sent (welcome, assign or version)
    silent: bool = False
    returned: int = 0
    max_message_bytes: int = 0  # the largest message it takes (its hello); below ours: assigned nothing
    idle_s: float = 0.0  # its generation's wait for work so far (its last report)
    idle_mark: float = 0.0  # idle_s at the last `metrics` (its idle since then is the step's)


@dataclass(slots=True)
class Accepted:
    """A result taken into the trainer: its work item and validated frames."""

    item: WorkItem
    frames: ResultFrames
    received_at: float


@dataclass
class EndpointStats:
    results: int = 0
    duplicates: int = 0
    stale: int = 0
    malformed: int = 0
    reassigned: int = 0
    deferred: int = 0  # messages to workers that a full queue refused (sent again later)
    bytes_in: int = 0
    last_error: str = ""
    bad_by_sender: Counter = field(default_factory=Counter)


class StreamEndpoint:
    """Binds `cfg.bind` (see StreamConfig) and serves work items to workers.

    max_staleness: results made more than this many policy versions before the current one are
        dropped and their prompts re-assigned (None: accept any version).
    """

    def __init__(self, cfg: StreamConfig, policy_version: int = 0, max_staleness: int | None = None,
                 session: str | None = None) -> None:
        check_bind_address(cfg.bind, cfg.allow_all_interfaces)
        self.cfg = cfg
        self.session = session or uuid.uuid4().hex[:12]
        self.policy_version = policy_version
        self.max_staleness = max_staleness
        self.stats = EndpointStats()
        self.items: dict[str, WorkItem] = {}
        self.pending: deque[str] = deque()
        self.owner: dict[str, str] = {}
        self.done: set[str] = set()
        self.workers: dict[str, _Worker] = {}
        self.left: list[str] = []  # workers that said goodbye, in order (named when the stream stalls)
        self._by_identity: dict[bytes, str] = {}
        self._replaced: dict[str, float] = {}  # incarnation -> when a newer one of its name replaced it
        self._refused: set[str] = set()  # incarnations told to stop (a second live worker with a name)
        self._acks: dict[bytes, list[str]] = {}
        self._acks_since = 0.0  # when the oldest unsent ack was queued
        # Acks only free a worker's re-send copies (credits come back at acceptance), so they go in
        # batches: with the worker's next assignment (one wake-up of the worker for both), at half
        # a window, or after ACK_DELAY_S, whichever comes first.
        self._ack_batch = max(1, cfg.credits_per_worker // 2)
        self.staleness = Counter()
        self._ctx = zmq.Context()
        self._sock = self._socket(cfg)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._topup_due = False  # an accepted result freed enough credit for `_assign` to send
        self._closed = False
        self.last_progress = time.monotonic()

    def _socket(self, cfg: StreamConfig) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # refuse (zmq.Again) instead of silently dropping a message to a worker whose queue is full:
        # a dropped assignment would leave its prompts held by a live worker that never got them
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.RCVHWM, cfg.high_water_mark)
        sock.setsockopt(zmq.SNDHWM, cfg.high_water_mark)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        if cfg.curve_secret_key:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt_string(zmq.CURVE_SECRETKEY, cfg.curve_secret_key)
            sock.setsockopt_string(zmq.CURVE_PUBLICKEY, cfg.curve_public_key)
        try:
            sock.bind(cfg.bind)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._ctx.term()
            raise ValueError(f"transport.bind: cannot bind {cfg.bind!r}: {e}. Fix: pick a free port or port 0") from e
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        self.endpoint = last.decode() if isinstance(last, bytes) else str(last)
        return sock

    # --- the trainer's side ---------------------------------------------------------------------

    def submit(self, items: list[WorkItem], front: bool = False) -> None:
        """Queue prompts for the workers; sample ids must be new."""
        for item in items:
            if item.sample_id in self.items or item.sample_id in self.done:
                raise ValueError(f"sample id {item.sample_id!r} was already submitted")
            self.items[item.sample_id] = item
        ids = [i.sample_id for i in items]
        if front:
            self.pending.extendleft(reversed(ids))
        else:
            self.pending.extend(ids)

    def cancel(self, ids: list[str]) -> None:
        """Withdraw submitted items (a worker still holding one gets it acknowledged and dropped)."""
        for sid in ids:
            if self.items.pop(sid, None) is not None:
                owner = self.workers.get(self.owner.pop(sid, ""))
                if owner is not None:
                    owner.in_flight.pop(sid, None)
                self.done.add(sid)  # a late result is a duplicate, not an error

    def set_version(self, version: int) -> None:
        """The engines now serve policy `version`; workers tag later groups with it."""
        self.policy_version = version
        self._send_versions()

    def _send_versions(self) -> None:
        """Tells each worker that has not heard it the current policy version."""
        for w in self.workers.values():
            if w.version != self.policy_version and not w.silent and self._send(
                    w.identity, VERSION, {"session": self.session, "policy_version": self.policy_version}):
                w.version = self.policy_version

    def outstanding(self) -> list[str]:
        return list(self.items)

    def in_flight(self) -> dict[str, int]:
        return {name: len(w.in_flight) for name, w in self.workers.items()}

    def poll(self, timeout_ms: int = 100, max_messages: int = 256, max_bytes: int = 1 << 20) -> list[Accepted]:
        """Handles what arrives within `timeout_ms` (returns as soon as results are in), checks
        deadlines, assigns pending prompts and acknowledges. Returns newly accepted results,
        about `max_bytes` of received messages at most (at least one message): the caller frees
        received buffers a few at a time, so the allocator hands them straight back to ZeroMQ's
        I/O thread (freeing tens of MB at once, glibc returns them to the kernel and the next
        messages fault their pages in again: ~40 more page faults per 8k-token group)."""
        if self._closed:
            raise RuntimeError("poll on a closed StreamEndpoint")
        out: list[Accepted] = []
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000.0
        handled = taken = 0
        self._assign()
        while handled < max_messages and not (out and taken >= max_bytes):
            if not readable(self._sock):  # (cheaper than a poll when one is queued)
                wait = 0 if out else max(0, int((deadline - time.monotonic()) * 1000))
                if not wait or not self._poller.poll(wait):  # (Socket.poll builds a poller per call)
                    break
            frames = recv_frames(self._sock)
            handled += 1
            taken += self._handle(frames, out)
            # Credits are given back as soon as a top-up is due, not when the queue drains: a worker
            # that streams steadily never waits for the trainer to catch up (no bubble per window).
            if self._topup_due:
                self._assign()
        self._check_silent()
        self._assign()
        self._flush_acks(force=time.monotonic() - self._acks_since >= ACK_DELAY_S)
        self._send_versions()  # (only to a worker whose queue was full when the version changed)
        if out:
            self.last_progress = time.monotonic()
        return out

    def describe_workers(self) -> str:
        now = time.monotonic()
        if not self.workers:
            if self.left:
                return f"no worker is connected; {', '.join(repr(n) for n in self.left[-5:])} said goodbye (see their logs)"
            return "no worker has connected"
        return "; ".join(f"'{w.name}' last heard {now - w.last_seen:.1f}s ago, holds {len(w.in_flight)}"
                         + (" (silent)" if w.silent else "") for w in self.workers.values())

    # --- messages ---------------------------------------------------------------------------------

    def _handle(self, frames: list[Any], out: list[Accepted]) -> int:
        """Validates and acts on one message; returns its size in bytes."""
        identity = frames[0].bytes if frames else b""
        size = 0
        try:
            if len(frames) < 2:
                raise WireError("frames: no payload after the routing identity")
            size = sum(map(len, frames[1:]))
            self.stats.bytes_in += size
            if size > self.cfg.max_message_bytes:
                raise WireError(f"message of {size} bytes exceeds transport.max_message_bytes={self.cfg.max_message_bytes}")
            msg_type, meta, arrays = decode_arrays(frames[1:])
            if msg_type == RESULTS:
                self._on_results(identity, decode_results(meta, arrays, self.cfg.max_token_id), out)
            elif msg_type == RESULT:
                self._on_result(identity, decode_result(meta, arrays, self.cfg.max_token_id), out)
            elif msg_type in (HELLO, HEARTBEAT):
                self._on_peer(identity, check_peer(meta, msg_type), msg_type == HELLO)
            elif msg_type == BYE:
                self._on_bye(identity)
            else:
                raise WireError(f"header.type: unknown message type {msg_type!r}")
        except WireError as e:
            self._bad(identity, str(e))
        return size

    def _sender(self, identity: bytes) -> str:
        name = self._by_identity.get(identity)
        return f"worker '{name}'" if name else f"unregistered peer {identity.hex()}"

    def _bad(self, identity: bytes, error: str) -> None:
        self.stats.malformed += 1
        self.stats.last_error = error
        n = self.stats.bad_by_sender[identity] = self.stats.bad_by_sender[identity] + 1
        if len(self.stats.bad_by_sender) > 10_000:  # bound the per-sender table under a flood of peers
            self.stats.bad_by_sender = Counter(dict(self.stats.bad_by_sender.most_common(1000)))
        if n <= _LOG_FIRST_BAD or n % 1000 == 0:
            logger.warning("rollout stream: dropped a bad message #%d from %s: %s", n, self._sender(identity), error)

    def _on_peer(self, identity: bytes, rep: PeerReport, hello: bool) -> None:
        now = time.monotonic()
        w = self.workers.get(rep.worker)
        if w is not None and w.incarnation != rep.incarnation:
            if rep.incarnation in self._replaced:
                self._from_replaced(identity, rep, w, now)
                return
            self._replaced[w.incarnation] = now
            while len(self._replaced) > 1000:  # (bounded: the oldest go first)
                del self._replaced[next(iter(self._replaced))]
            self._by_identity.pop(w.identity, None)  # (a goodbye on the old connection is not the new one's)
            self._requeue(w, list(w.in_flight), f"restarted (incarnation {w.incarnation} -> {rep.incarnation})")
            w = None
        moved = w is not None and w.identity != identity
        if w is None:
            w = self.workers[rep.worker] = _Worker(rep.worker, rep.incarnation, identity, rep.capacity, now)
            w.idle_s = w.idle_mark = rep.idle_s  # (its wait before it joined is no step's)
            logger.info("rollout stream: worker '%s' joined (capacity %d)", rep.worker, rep.capacity)
        self._by_identity.pop(w.identity, None)
        if rep.max_message_bytes != w.max_message_bytes:  # (a new worker's is 0)
            self._check_limit(rep)
        w.identity, w.capacity, w.last_seen, w.max_message_bytes = identity, rep.capacity, now, rep.max_message_bytes
        w.idle_s = rep.idle_s
        self._by_identity[identity] = w.name
        if w.silent:
            logger.info("rollout stream: worker '%s' is back", w.name)
            w.silent = False
        seen = rep.seen_seq if rep.session == self.session else -1
        # Prompts sent to this worker that it does not hold: lost on a dropped connection.
        lost = [sid for sid, seq in w.in_flight.items() if sid not in rep.held and (moved or seq <= seen)]
        if lost:
            self._requeue(w, lost, "reconnected without them" if moved else "does not hold them")
        # (a welcome refused by a full queue is sent again on this worker's next report)
        if (hello or rep.session != self.session) and self._send(identity, WELCOME, {
                "session": self.session, "policy_version": self.policy_version,
                "max_message_bytes": self.cfg.max_message_bytes}):
            w.version = self.policy_version

    def _from_replaced(self, identity: bytes, rep: PeerReport, w: _Worker, now: float) -> None:
        """A report from an incarnation that a newer one of the same name replaced. Just after the
        replacement it is a restarted worker's last message (dropped); later, the old one is alive:
        two workers share the name, and the old one is told to stop (its prompts went to the new
        one when it was replaced). Before, each report flipped the name between them and took the
        other's prompts away."""
        if now - self._replaced[rep.incarnation] < max(1.0, 2 * self.cfg.heartbeat_s):
            return
        reason = (f"another live worker is called '{rep.worker}' (incarnation {w.incarnation}), and it replaced "
                  f"this one ({rep.incarnation}). Fix: start each worker with its own --name")
        if self._send(identity, REFUSE, {"reason": reason}) and rep.incarnation not in self._refused:
            self._refused.add(rep.incarnation)
            logger.error("rollout stream: two live workers are called '%s' (incarnations %s and %s): told the "
                         "older one to stop. Fix: start each worker with its own --name", rep.worker,
                         rep.incarnation, w.incarnation)

    def _check_limit(self, rep: PeerReport) -> None:
        """Logs a worker whose receive limit is below ours: an assignment we size to our limit could
        be dropped by its socket, so it gets none (and stops itself once welcomed)."""
        if rep.max_message_bytes < self.cfg.max_message_bytes:
            logger.warning("rollout stream: worker '%s' takes messages of at most %d bytes, below the trainer's "
                           "transport.max_message_bytes=%d: it is assigned nothing. Fix: start it with the "
                           "trainer's transport settings", rep.worker, rep.max_message_bytes,
                           self.cfg.max_message_bytes)

    def _on_bye(self, identity: bytes) -> None:
        name = self._by_identity.pop(identity, None)
        w = self.workers.pop(name, None) if name else None
        if w is not None:
            self._requeue(w, list(w.in_flight), "said goodbye")
            self.left = [n for n in self.left if n != w.name][-99:] + [w.name]

    def _on_results(self, identity: bytes, members: list[ResultFrames | WireError], out: list[Accepted]) -> None:
        """Each member of a `results` message as if it had come alone: a bad one is rejected (and
        logged with its sender), the others are taken."""
        for i, member in enumerate(members):
            try:
                if isinstance(member, WireError):
                    raise member
                self._on_result(identity, member, out)
            except WireError as e:
                self._bad(identity, f"results[{i}]: {e}")

    def _on_result(self, identity: bytes, frames: ResultFrames, out: list[Accepted]) -> None:
        m = frames.meta
        sid, now = m["sample_id"], time.monotonic()
        name = self._by_identity.get(identity)
        if name is not None:
            self.workers[name].last_seen = now
        item = self.items.get(sid)
        n = None if item is None else item.params.get("n")
        if n is not None and len(m["lengths"]) != n:
            raise WireError(f"result '{sid}': {len(m['lengths'])} responses, the assignment asked for n={n}")
        if not self._acks:
            self._acks_since = now
        self._acks.setdefault(identity, []).append(sid)  # taken or not wanted: the worker may forget it
        if item is None:
            self.stats.duplicates += 1
            return
        owner = self.workers.get(self.owner.get(sid, ""))
        age = self.policy_version - m["policy_version"]
        if self.max_staleness is not None and age > self.max_staleness:
            self.stats.stale += 1
            if owner is None or owner.name == name:  # else its new owner is still working on it
                if owner is not None:
                    owner.in_flight.pop(sid, None)
                self.owner.pop(sid, None)
                if sid not in self.pending:
                    self.pending.appendleft(sid)
            return
        del self.items[sid]
        self.done.add(sid)
        self.owner.pop(sid, None)
        if owner is not None:
            owner.in_flight.pop(sid, None)
            owner.returned += 1
            if not self._topup_due and self.pending:
                self._topup_due = self._wants_topup(owner)
        self.staleness[age if age > 0 else 0] += 1
        self.stats.results += 1
        out.append(Accepted(item, frames, now))

    # --- assignment -------------------------------------------------------------------------------

    def _requeue(self, w: _Worker, ids: list[str], why: str) -> None:
        ids = [sid for sid in ids if sid in w.in_flight]
        for sid in ids:
            del w.in_flight[sid]
            if sid in self.items and self.owner.get(sid) == w.name:
                del self.owner[sid]
                self.pending.appendleft(sid)
        if ids:
            self.stats.reassigned += len(ids)
            shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
            logger.warning("rollout stream: worker '%s' %s: re-assigning %d prompt(s) [%s]", w.name, why, len(ids), shown)

    def _check_silent(self) -> None:
        now = time.monotonic()
        for w in self.workers.values():
            if not w.silent and now - w.last_seen > self.cfg.worker_timeout_s:
                w.silent = True
                self._requeue(w, list(w.in_flight), f"silent for {now - w.last_seen:.1f}s "
                              f"(transport.worker_timeout_s={self.cfg.worker_timeout_s})")
                if not w.in_flight:
                    logger.warning("rollout stream: worker '%s' silent for %.1fs", w.name, now - w.last_seen)

    def _wants_topup(self, w: _Worker) -> bool:
        """A worker is topped up once half of its window is free (or the queue is short): fewer,
        larger assign messages for the same window (each message to a worker can cost a context
        switch on a busy host), while it still holds half a window of work."""
        window = min(w.capacity, self.cfg.credits_per_worker) if w.max_message_bytes >= self.cfg.max_message_bytes else 0
        return not w.silent and window - len(w.in_flight) >= min(len(self.pending), max(1, window // 2))

    def _assign(self) -> bool:
        """Round-robin over live workers with credit, one assignment per worker (split only to fit
        transport.max_message_bytes); True if any was sent."""
        self._topup_due = False
        live = [w for w in self.workers.values() if self._wants_topup(w)]
        batches: dict[str, list[WorkItem]] = {}
        progress = True
        while self.pending and progress:
            progress = False
            for w in live:
                if not self.pending:
                    break
                if len(w.in_flight) + len(batches.get(w.name, [])) < min(w.capacity, self.cfg.credits_per_worker):
                    sid = self.pending.popleft()
                    if sid not in self.items:
                        continue
                    batches.setdefault(w.name, []).append(self.items[sid])
                    progress = True
        sent = False
        for name, items in batches.items():
            w = self.workers[name]
            if w.identity in self._acks and self._send(w.identity, ACK, {"session": self.session,
                                                                         "ids": self._acks[w.identity]}):
                del self._acks[w.identity]
            refused = self._send_assign(w, items)
            self.pending.extendleft(reversed([i.sample_id for i in refused]))  # queue full: next poll
            sent = sent or len(refused) < len(items)
        return sent

    def _send_assign(self, w: _Worker, items: list[WorkItem]) -> list[WorkItem]:
        """Assigns `items` to `w` in one message, or in halves until each is under
        transport.max_message_bytes (the worker's socket refuses a larger one); returns the items
        that a full queue refused."""
        frames = encode(ASSIGN, {"session": self.session, "seq": w.seq + 1, "policy_version": self.policy_version,
                                 "items": [item_to_wire(i) for i in items]})
        if memoryview(frames[0]).nbytes > self.cfg.max_message_bytes:
            if len(items) == 1:
                raise PromptTooLarge(
                    f"prompt '{items[0].prompt.id}' is {memoryview(frames[0]).nbytes} bytes on the wire, over "
                    f"transport.max_message_bytes={self.cfg.max_message_bytes}: no worker could take it. Fix: raise "
                    "transport.max_message_bytes (trainer and workers)")
            half = len(items) // 2
            return self._send_assign(w, items[:half]) + self._send_assign(w, items[half:])
        if not self._send_frames(w.identity, ASSIGN, frames):
            return items
        w.seq, w.version = w.seq + 1, self.policy_version
        for item in items:
            w.in_flight[item.sample_id] = w.seq
            self.owner[item.sample_id] = w.name
        return []

    def _flush_acks(self, force: bool) -> None:
        """Acknowledges per worker once a batch is due (or every pending id when `force`)."""
        for identity in [i for i, ids in self._acks.items() if force or len(ids) >= self._ack_batch]:
            if self._send(identity, ACK, {"session": self.session, "ids": self._acks[identity]}):
                del self._acks[identity]  # (else that worker's queue is full: kept for the next poll)
        if force or not self._acks:
            self._acks_since = time.monotonic()

    def _send(self, identity: bytes, msg_type: str, meta: dict[str, Any]) -> bool:
        """False when the worker's queue is full (nothing was queued: the caller retries later).
        True when queued, or when that connection is gone: then the worker's reconnect (or its
        silence) re-issues what it held, as for anything lost with a connection."""
        return self._send_frames(identity, msg_type, encode(msg_type, meta))

    def _send_frames(self, identity: bytes, msg_type: str, frames: list[Any]) -> bool:
        """`_send` for a message already encoded."""
        try:
            send_frames(self._sock, [identity, *frames])
        except zmq.Again:
            self.stats.deferred += 1
            logger.debug("rollout stream: queue to %s is full; %s deferred", self._sender(identity), msg_type)
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            logger.debug("rollout stream: %s is not connected; %s not sent", self._sender(identity), msg_type)
        return True

    def metrics(self) -> dict[str, float]:
        """Scalars for the step summary (prefix `stream/`)."""
        out = {"queue_depth": float(len(self.pending)), "outstanding": float(len(self.items)),
               "workers": float(sum(not w.silent for w in self.workers.values())),
               "duplicates": float(self.stats.duplicates), "stale_dropped": float(self.stats.stale),
               "malformed": float(self.stats.malformed), "reassigned": float(self.stats.reassigned),
               "deferred": float(self.stats.deferred)}
        idle = []
        for name, w in self.workers.items():
            out[f"in_flight/{name}"] = float(len(w.in_flight))
            idle.append(w.idle_s - w.idle_mark)
            out[f"worker_idle/{name}"], w.idle_mark = idle[-1], w.idle_s
        if idle:  # seconds each worker's generation waited for work since the last call (heartbeat resolution)
            out["worker_idle"] = sum(idle) / len(idle)
        total = sum(self.staleness.values())
        for age, count in sorted(self.staleness.items()):
            out[f"staleness/{age}"] = count / total
        return out

    def close(self, goodbye: bool = True) -> None:
        """`goodbye`: tell connected workers the run is over (they exit)."""
        if not self._closed:
            self._closed = True
            if goodbye:
                self._flush_acks(force=True)
                for w in self.workers.values():
                    self._send(w.identity, BYE, {"session": self.session})
            self._sock.close(linger=500 if goodbye else 0)
            self._ctx.term()

    def __enter__(self) -> StreamEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["StreamEndpoint", "StreamStalled", "PromptTooLarge", "Accepted", "EndpointStats"]
