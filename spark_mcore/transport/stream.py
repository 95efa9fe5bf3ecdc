"""ZeroMQ stream of rollout groups and reward samples from rollout workers to the trainer.

Sockets: each producer is a DEALER that connects; the consumer is a ROUTER that binds.
Why DEALER/ROUTER and not PUSH/PULL: flow control is credit based, which needs a return path
from the consumer to each producer (ROUTER addresses producers by identity). With PUSH/PULL the
only bound is the HWM plus kernel socket buffers, whose size is neither known nor small, so a
slow trainer would still let megabytes pile up; with credits the bound is exact.

Protocol (all frames in the pickle-free format of `wire`):
  producer -> consumer  "hello"    {producer}                              no credit needed
  consumer -> producer  "credit"   {n}                                     grants n sends
  producer -> consumer  "groups"   {producer, seq, policy_version, records: [group, ...]}
  producer -> consumer  "rewards"  {producer, seq, policy_version, records: [reward sample, ...]}
  producer -> consumer  "bye"      {producer}
Invariant: a producer has at most `credits_per_producer` data messages that the consumer has
not yet handed to its caller, so the consumer's memory is bounded by
credits x producers x message size. A message counts as handed over (and its credit goes back)
when `recv` returns it, is dropped as stale, or is rejected as malformed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from spark_mcore.transport.records import (
    group_from_wire,
    group_to_wire,
    reward_sample_from_wire,
    reward_sample_to_wire,
)
from spark_mcore.transport.wire import WireError, decode, encode
from spark_mcore.types import RewardSample, RolloutGroup

logger = logging.getLogger(__name__)

MSG_HELLO, MSG_CREDIT, MSG_BYE = "hello", "credit", "bye"
MSG_GROUPS, MSG_REWARDS = "groups", "rewards"


class BackPressureTimeout(TimeoutError):
    """The consumer granted no credit in time: the trainer is slower than the rollout workers."""


@dataclass
class StreamBatch:
    """What one `recv` returns; `*_versions[i]` is the policy version of the i-th record."""

    groups: list[RolloutGroup] = field(default_factory=list)
    group_versions: list[int] = field(default_factory=list)
    reward_samples: list[RewardSample] = field(default_factory=list)
    reward_versions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups) + len(self.reward_samples)


@dataclass
class ConsumerStats:
    """Counters since the consumer started. `dropped_stale` counts records (groups + samples)."""

    messages: int = 0
    groups: int = 0
    reward_samples: int = 0
    dropped_stale: int = 0
    malformed: int = 0
    last_error: str = ""


def _check_endpoint(endpoint: str, example: str) -> None:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ValueError(f"endpoint: expected a ZeroMQ address like '{example}', got {endpoint!r}")


def _bind_endpoint(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the concrete endpoint (a tcp port of 0 or * becomes the chosen port)."""
    sock.bind(endpoint)
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


class RolloutConsumer:
    """The trainer side: binds a ROUTER, hands out credits, filters stale records.

    endpoint: where to bind; "tcp://127.0.0.1:0" picks a free port (see `.endpoint`).
    max_staleness: records older than `policy_version - max_staleness` are dropped and
        counted in `stats.dropped_stale`; None keeps everything.
    credits_per_producer: data messages each producer may have in flight (the memory bound).
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", max_staleness: int | None = None,
                 credits_per_producer: int = 4, high_water_mark: int = 1000, policy_version: int = 0) -> None:
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0 or None, got {max_staleness}")
        if credits_per_producer < 1:
            raise ValueError(f"credits_per_producer: must be >= 1, got {credits_per_producer}")
        if high_water_mark < credits_per_producer:
            raise ValueError(f"high_water_mark ({high_water_mark}) must be >= credits_per_producer "
                             f"({credits_per_producer}) or ZeroMQ would drop/block below the credit window")
        _check_endpoint(endpoint, "tcp://127.0.0.1:0")
        self.max_staleness = max_staleness
        self.credits_per_producer = credits_per_producer
        self.policy_version = policy_version
        self.stats = ConsumerStats()
        self._producers: dict[bytes, str] = {}
        self._pending_credit: defaultdict[bytes, int] = defaultdict(int)
        self._handlers: dict[str, Callable[[bytes, dict[str, Any], StreamBatch], None]] = {
            MSG_HELLO: self._on_hello,
            MSG_BYE: self._on_bye,
            MSG_GROUPS: self._on_groups,
            MSG_REWARDS: self._on_rewards,
        }
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, high_water_mark)
        self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
        try:
            self.endpoint = _bind_endpoint(self._sock, endpoint)
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            self._ctx.term()
            raise ValueError(f"endpoint: cannot bind {endpoint!r}: {e}") from e
        self._closed = False

    @property
    def num_producers(self) -> int:
        return len(self._producers)

    def recv(self, timeout_ms: int = 1000, max_messages: int = 64) -> StreamBatch:
        """Wait up to `timeout_ms` for records, then drain what is already queued (at most
        `max_messages` data messages). Returns an empty batch on timeout. Never raises for a bad
        message: it is counted in `stats.malformed` and skipped."""
        if self._closed:
            raise RuntimeError("recv on a closed RolloutConsumer")
        batch = StreamBatch()
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000.0
        handled = 0
        while handled < max_messages:
            self._flush_credits()
            wait_ms = 0 if len(batch) else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait_ms, zmq.POLLIN):
                break
            frames = self._sock.recv_multipart(copy=False)
            handled += self._handle(frames, batch)
        self._flush_credits()
        return batch

    def _handle(self, frames: list[Any], batch: StreamBatch) -> int:
        """Process one ROUTER message; returns 1 for a data message, 0 for control."""
        identity = frames[0].bytes if frames else b""
        msg_type = ""
        try:
            if len(frames) < 2:
                raise WireError("frames: message carries no payload after the routing identity")
            msg_type, meta, _tensors = decode(frames[1:])
            handler = self._handlers.get(msg_type)
            if handler is None:
                raise WireError(f"header.type: unknown message type {msg_type!r}; expected one of {sorted(self._handlers)}")
            handler(identity, meta, batch)
        except WireError as e:
            self.stats.malformed += 1
            self.stats.last_error = str(e)
            logger.warning("rollout stream: rejected a malformed message: %s", e)
        if msg_type in (MSG_HELLO, MSG_BYE):
            return 0
        # Anything else spent a credit (even if rejected): give it back or the window shrinks.
        if identity in self._producers:
            self._pending_credit[identity] += 1
        return 1

    def _on_hello(self, identity: bytes, meta: dict[str, Any], batch: StreamBatch) -> None:
        name = meta.get("producer")
        if not isinstance(name, str):
            raise WireError(f"hello.meta.producer: expected a string, got {name!r}")
        if identity not in self._producers:
            self._pending_credit[identity] += self.credits_per_producer
        self._producers[identity] = name

    def _on_bye(self, identity: bytes, meta: dict[str, Any], batch: StreamBatch) -> None:
        self._producers.pop(identity, None)
        self._pending_credit.pop(identity, None)

    def _data_version(self, identity: bytes, meta: dict[str, Any], kind: str) -> tuple[int, list[Any]] | None:
        """Validates the data header; returns None (and counts) when the message is stale."""
        version, records = meta.get("policy_version"), meta.get("records")
        if not isinstance(version, int) or isinstance(version, bool):
            raise WireError(f"{kind}.meta.policy_version: expected an integer, got {version!r}")
        if not isinstance(records, list):
            raise WireError(f"{kind}.meta.records: expected a list, got {type(records).__name__}")
        self.stats.messages += 1
        if self.max_staleness is not None and version < self.policy_version - self.max_staleness:
            self.stats.dropped_stale += len(records)
            return None
        return version, records

    def _on_groups(self, identity: bytes, meta: dict[str, Any], batch: StreamBatch) -> None:
        checked = self._data_version(identity, meta, MSG_GROUPS)
        if checked is None:
            return
        version, records = checked
        # Parse all before appending any: a message is accepted or rejected as a whole.
        groups = [group_from_wire(r, f"groups.meta.records[{i}]") for i, r in enumerate(records)]
        batch.groups.extend(groups)
        batch.group_versions.extend([version] * len(groups))
        self.stats.groups += len(groups)

    def _on_rewards(self, identity: bytes, meta: dict[str, Any], batch: StreamBatch) -> None:
        checked = self._data_version(identity, meta, MSG_REWARDS)
        if checked is None:
            return
        version, records = checked
        samples = [reward_sample_from_wire(r, f"rewards.meta.records[{i}]") for i, r in enumerate(records)]
        batch.reward_samples.extend(samples)
        batch.reward_versions.extend([version] * len(samples))
        self.stats.reward_samples += len(samples)

    def _flush_credits(self) -> None:
        for identity, n in list(self._pending_credit.items()):
            if n > 0 and identity in self._producers:
                try:
                    self._sock.send_multipart([identity, *encode(MSG_CREDIT, {"n": n})], flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue  # peer queue full: keep the credit pending, retry on the next call
            self._pending_credit.pop(identity, None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> RolloutConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RolloutProducer:
    """A rollout worker's side: connects a DEALER and sends only while it holds credit.

    high_water_mark: ZeroMQ SNDHWM/RCVHWM in messages (a second bound beside the credits).
    send_timeout_ms: default time a send waits for credit before BackPressureTimeout.
    """

    def __init__(self, endpoint: str, high_water_mark: int = 64, send_timeout_ms: int = 30_000,
                 producer_id: str | None = None) -> None:
        _check_endpoint(endpoint, "tcp://127.0.0.1:5555")
        if high_water_mark < 1:
            raise ValueError(f"high_water_mark: must be >= 1, got {high_water_mark}")
        self.endpoint = endpoint
        self.producer_id = producer_id or f"producer-{uuid.uuid4().hex[:8]}"
        self.send_timeout_ms = send_timeout_ms
        self.sent_messages = 0
        self._credits = 0
        self._seq = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, high_water_mark)
        self._sock.setsockopt(zmq.RCVHWM, high_water_mark)
        # Credits keep the queue below the HWM; this only guards against a consumer that vanished.
        self._sock.setsockopt(zmq.SNDTIMEO, max(send_timeout_ms, 1))
        try:
            self._sock.connect(endpoint)
            self._sock.send_multipart(encode(MSG_HELLO, {"producer": self.producer_id}))
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            self._ctx.term()
            raise ValueError(f"endpoint: cannot connect to {endpoint!r}: {e}") from e
        self._closed = False

    @property
    def credits(self) -> int:
        """Sends allowed right now (after reading any credit that has arrived)."""
        self._drain_control(0)
        return self._credits

    def send_groups(self, groups: list[RolloutGroup], policy_version: int, timeout_ms: int | None = None) -> None:
        """Send verified groups made by `policy_version`; blocks while out of credit and raises
        BackPressureTimeout after `timeout_ms` (default `send_timeout_ms`)."""
        self._send(MSG_GROUPS, [group_to_wire(g) for g in groups], policy_version, timeout_ms)

    def send_reward_samples(self, samples: list[RewardSample], policy_version: int,
                            timeout_ms: int | None = None) -> None:
        self._send(MSG_REWARDS, [reward_sample_to_wire(s) for s in samples], policy_version, timeout_ms)

    def _send(self, msg_type: str, records: list[dict[str, Any]], policy_version: int, timeout_ms: int | None) -> None:
        if self._closed:
            raise RuntimeError("send on a closed RolloutProducer")
        if not isinstance(policy_version, int) or isinstance(policy_version, bool) or policy_version < 0:
            raise ValueError(f"policy_version: expected an integer >= 0, got {policy_version!r}")
        meta = {"producer": self.producer_id, "seq": self._seq, "policy_version": policy_version, "records": records}
        frames = encode(msg_type, meta)  # encode first: a bad record must not cost a credit
        timeout = self.send_timeout_ms if timeout_ms is None else timeout_ms
        self._wait_credit(timeout)
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again as e:
            raise BackPressureTimeout(f"the ZeroMQ queue to {self.endpoint} stayed full for "
                                      f"{self.send_timeout_ms} ms (consumer gone?)") from e
        self._credits -= 1
        self._seq += 1
        self.sent_messages += 1

    def _wait_credit(self, timeout_ms: int) -> None:
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000.0
        self._drain_control(0)
        while self._credits <= 0:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0:
                raise BackPressureTimeout(
                    f"no credit from the consumer at {self.endpoint} within {timeout_ms} ms: the trainer is "
                    "not draining the stream (back-pressure), or no consumer is bound there"
                )
            self._drain_control(remaining)

    def _drain_control(self, wait_ms: int) -> None:
        """Read credit messages; waits up to `wait_ms` for the first one."""
        while self._sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0
            try:
                msg_type, meta, _ = decode(self._sock.recv_multipart(copy=False))
                n = meta.get("n")
                if msg_type != MSG_CREDIT or not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise WireError(f"credit: expected type 'credit' with meta.n >= 1, got {msg_type!r} {meta!r}")
            except WireError as e:
                logger.warning("rollout stream: ignored a malformed control message: %s", e)
                continue
            self._credits += n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:  # best effort: with linger 0 the consumer may never see it, which it tolerates
            self._sock.send_multipart(encode(MSG_BYE, {"producer": self.producer_id}), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> RolloutProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RolloutProducer", "RolloutConsumer", "StreamBatch", "ConsumerStats", "BackPressureTimeout"]
