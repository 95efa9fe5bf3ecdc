"""Rollout sources: where the training loop gets a step's verified groups.

The loop asks `source.collect(request)` and does not know the topology:
  InProcessSource  engine + verifier pool in the trainer processes (the embedded default)
  StreamSource     `spark-mcore rollout-worker` processes over the trainer's ZeroMQ endpoint
Both take the step's policy prompts from the loader themselves (`request.policy`), so the
stream source can assign prompts of later steps ahead of time in async mode. Data position:
the loader plus `state_dict()` (prompts taken from the loader but not yet trained on) is what
a checkpoint must hold; after a resume those prompts are assigned again, so nothing is lost
and nothing is trained twice.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from spark_mcore.errors import UserError
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.rollout.divide import DividedRollout
from spark_mcore.rollout.groups import generate_groups, score_groups
from spark_mcore.rollout.prefix import PrefixRollouts, prefix_metrics
from spark_mcore.transport.endpoint import StreamEndpoint, StreamStalled
from spark_mcore.transport.protocol import WorkItem, item_from_wire, item_to_wire
from spark_mcore.types import Prompt, RewardSample, RolloutGroup


@dataclass
class StepRequest:
    """iteration: the loop's step counter (sampling seed); policy_step: policy steps done before
    this one (SPARK recycling seeds); policy: take a batch of policy prompts from the loader;
    reward_prompts: SPARK reward tasks to roll out in this step too."""

    iteration: int
    policy_step: int
    policy: bool
    reward_prompts: list[Prompt]
    params: SamplingParams


@dataclass
class StepRollouts:
    """groups: policy groups first (loader order), then reward-task groups; candidates[i]: group
    i's SPARK tasks as recycled by a worker, or None when the trainer recycles itself."""

    groups: list[RolloutGroup]
    candidates: list[list[RewardSample]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    off_policy: bool = False  # groups may come from older policy versions (correct with TIS)


@runtime_checkable
class RolloutSource(Protocol):
    def collect(self, request: StepRequest) -> StepRollouts:
        """The verified groups of one step (blocks until they are all there)."""
        ...

    def weights_pushed(self, version: int) -> None:
        """The engines now serve policy `version`."""
        ...

    def prefetch(self, policy: bool, reward_prompts: list[Prompt]) -> None:
        """A hint: the next step will probably be a policy step (`policy`) with these SPARK
        reward-task prompts; a source that works ahead (async) starts on them now."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def close(self) -> None:
        ...


class Scorer(Protocol):
    def score(self, items: list[tuple[str, str, str]]) -> list[float]:
        """Rewards of (verifier, response, answer) triples (a VerifierPool)."""
        ...


class InProcessSource:
    """Generates and verifies in the trainer processes (lock-step). `pool.score` is looked up at
    each step, so a replaced scorer takes effect. With a ParallelState (`pstate`), the work is
    divided over DP replicas (`rollout.divide.DividedRollout`: each replica's first rank
    generates and verifies its share, every rank gets all groups); without, this process does
    it all. Called on every rank with the same request (a collective when divided)."""

    def __init__(self, engine: RolloutEngine | None, encode: Callable[[Prompt], list[int]], pool: Scorer,
                 loader: Iterator[list[Prompt]], pstate: Any = None, prefix: PrefixRollouts | None = None) -> None:
        self.engine, self.encode, self.pool, self.loader = engine, encode, pool, loader
        self._stats: dict[str, float] = {}
        self.produce = None if pstate is None else DividedRollout(self._local, pstate, stats=self._stats)
        self.prefix = prefix  # Prefix-RFT: policy steps continue demonstration prefixes
        self._bounds: tuple[float, float] | None = None  # this step's prefix fraction bounds, None: off

    def _local(self, prompts: list[Prompt], params: SamplingParams) -> list[RolloutGroup]:
        start = time.perf_counter()
        if self.prefix is not None and self._bounds is not None:
            groups = self.prefix.generate(self.engine, prompts, self.encode, params, self._bounds)  # type: ignore[arg-type]
        else:
            groups = generate_groups(self.engine, prompts, self.encode, params)  # type: ignore[arg-type]
        mid = time.perf_counter()
        score_groups(groups, self.pool.score)
        self._stats.update({"time/generate": mid - start, "time/verify": time.perf_counter() - mid})
        return groups

    def collect(self, request: StepRequest) -> StepRollouts:
        prompts = (next(self.loader) if request.policy else []) + request.reward_prompts
        self._stats.clear()
        self._bounds = self.prefix.bounds(request.policy_step) if self.prefix is not None and request.policy else None
        try:
            if self.produce is None:
                groups = self._local(prompts, request.params)
                mine = sum(len(g.rollouts) for g in groups)
            else:
                groups = self.produce(prompts, request.params)
                mine = self.produce.last_responses
        finally:
            bounds, self._bounds = self._bounds, None
        metrics = {**self._stats, "rollout/responses": float(sum(len(g.rollouts) for g in groups)),
                   "rollout/responses_this_rank": float(mine)}
        if bounds is not None:
            metrics.update(prefix_metrics(groups, bounds))
        return StepRollouts(groups, None, metrics)

    def weights_pushed(self, version: int) -> None:
        pass

    def prefetch(self, policy: bool, reward_prompts: list[Prompt]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _params(p: SamplingParams, seed: int) -> dict[str, Any]:
    return {"n": p.n, "temperature": p.temperature, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens,
            "seed": seed, "stop_token_ids": list(p.stop_token_ids)}


class StreamSource:
    """Assigns prompts to rollout workers through `endpoint` and waits for their groups.

    max_staleness: None = sync mode (a step's prompts are assigned when the step asks for them,
    by the engines' current policy). An integer K >= 1 = async mode: `prefetch` assigns the next
    step's prompts (its policy batch, or its SPARK reward tasks) while the current step trains,
    so at most two steps of prompts are in flight; a group more than K versions older than the
    step that trains on it is generated again.
    """

    def __init__(self, endpoint: StreamEndpoint, loader: Iterator[list[Prompt]], max_staleness: int | None = None,
                 poll_ms: int = 20) -> None:
        if max_staleness is not None and max_staleness < 1:
            raise ValueError(f"max_staleness: async mode needs >= 1 (None = sync), got {max_staleness}")
        self.endpoint, self.loader, self.max_staleness, self.poll_ms = endpoint, loader, max_staleness, poll_ms
        self._batches: deque[list[WorkItem]] = deque()  # policy batches taken from the loader, not yet trained
        self._results: dict[str, Any] = {}
        self._counter = 0
        self.idle_s = 0.0
        self._hinted: dict[str, WorkItem] = {}  # prompt id -> reward item started ahead (prefetch)
        self._last: StepRequest | None = None
        # A pump thread owns the polling so that workers get acks and new assignments while the
        # trainer trains (async mode). Every endpoint call holds `_lock` (ZeroMQ sockets may
        # change threads only across a full memory barrier).
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._last_result = time.monotonic()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, name="rollout-stream", daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:  # callers wait at most poll_ms for the lock
                    got = self.endpoint.poll(self.poll_ms)
                if not got:
                    time.sleep(0.001)  # let a waiting caller take the lock
                    continue
                results = {a.item.sample_id: a.frames.to_result() for a in got}
                with self._arrived:
                    self._results.update(results)
                    self._last_result = time.monotonic()
                    self._arrived.notify_all()
        except BaseException as e:  # surfaced by the next collect
            with self._arrived:
                self._error = e
                self._arrived.notify_all()

    def _new_id(self, tag: str) -> str:
        self._counter += 1
        return f"{self.endpoint.session}:{tag}{self._counter}"

    def _submit(self, items: list[WorkItem], front: bool = False) -> None:
        with self._lock:
            self.endpoint.submit(items, front=front)

    def _policy_batch(self, step: int, params: SamplingParams) -> list[WorkItem]:
        """The next loader batch as work items of policy step `step` (seeds its recycling)."""
        seed = params.seed if params.seed is not None else 0
        items = [WorkItem(self._new_id("p"), p, _params(params, seed + step * 7919 + i), step, i, True)
                 for i, p in enumerate(next(self.loader))]
        self._submit(items)
        self._batches.append(items)
        return items

    def collect(self, request: StepRequest) -> StepRollouts:
        items: list[WorkItem] = []
        if request.policy:
            if not self._batches:
                self._policy_batch(request.policy_step, request.params)
            items = self._batches.popleft()
        items += self._reward_items(request)
        start = time.perf_counter()
        results = self._wait_fresh(items)
        waited = time.perf_counter() - start
        self.idle_s += waited
        with self._lock:
            stream_metrics = self.endpoint.metrics()
            version = self.endpoint.policy_version
        groups = [r.to_group(i.prompt) for r, i in zip(results, items, strict=True)]
        metrics = {"time/trainer_idle": waited, **{f"stream/{k}": v for k, v in stream_metrics.items()},
                   "stream/batches_ahead": float(len(self._batches)),
                   "stream/max_staleness_seen": float(max((version - r.policy_version for r in results), default=0)),
                   "time/worker_generate": sum(r.gen_s for r in results) / max(len(results), 1)}
        return StepRollouts(groups, [r.candidates for r in results], metrics, off_policy=self.max_staleness is not None)

    def _wait_fresh(self, items: list[WorkItem]) -> list[Any]:
        """Results of `items` in order; one older than max_staleness versions now (the policy
        moved on since it was accepted) is generated again under a new sample id."""
        limit = self.max_staleness or 0
        while True:
            self._wait({i.sample_id for i in items})
            with self._lock:
                version = self.endpoint.policy_version
                results = [self._results.pop(i.sample_id) for i in items]
            stale = [k for k, r in enumerate(results) if version - r.policy_version > limit]
            if not stale:
                return results
            for k in stale:
                items[k] = WorkItem(self._new_id("s"), items[k].prompt, items[k].params, items[k].step, items[k].index,
                                    items[k].recycle)
            self._submit([items[k] for k in stale], front=True)
            for k, r in enumerate(results):
                if k not in stale:
                    self._results[items[k].sample_id] = r

    def _reward_items(self, request: StepRequest) -> list[WorkItem]:
        """This step's reward-task items: those started ahead by `prefetch` when they match,
        new ones (submitted first in line) for the rest; unused prefetched ones are cancelled."""
        self._last = request
        hinted, self._hinted = self._hinted, {}
        items, new = [], []
        for p in request.reward_prompts:
            item = hinted.pop(p.id, None)
            if item is None or item.prompt != p:
                item = self._reward_item(p, request)
                new.append(item)
            items.append(item)
        with self._lock:
            self.endpoint.submit(new, front=True)  # this step needs them before later batches
            self.endpoint.cancel([i.sample_id for i in hinted.values()])
            for i in hinted.values():
                self._results.pop(i.sample_id, None)
        return items

    def _reward_item(self, p: Prompt, request: StepRequest) -> WorkItem:
        seed = request.params.seed if request.params.seed is not None else 0
        return WorkItem(self._new_id("r"), p, _params(request.params, seed + 104729 + self._counter),
                        request.policy_step, 0, False)

    def prefetch(self, policy: bool, reward_prompts: list[Prompt]) -> None:
        """Async mode: assign what the next step will ask for while this step trains (its groups
        are then one version old). Sync mode ignores the hint."""
        last = self._last
        if self.max_staleness is None or last is None:
            return
        if policy and not self._batches:
            self._policy_batch(last.policy_step + int(last.policy), last.params)
        items = [self._reward_item(p, last) for p in reward_prompts if p.id not in self._hinted]
        self._hinted.update({i.prompt.id: i for i in items})
        self._submit(items, front=True)

    def _wait(self, ids: set[str]) -> None:
        """Waits until every id has a result; raises StreamStalled naming the workers when no
        result arrives for transport.stall_timeout_s."""
        stall = self.endpoint.cfg.stall_timeout_s
        with self._arrived:
            self._last_result = max(self._last_result, time.monotonic())  # the clock starts with this wait
            while not ids <= self._results.keys():
                if isinstance(self._error, UserError):  # (its message names the setting and the fix)
                    raise self._error
                if self._error is not None:
                    raise RuntimeError(f"rollout stream failed: {self._error}") from self._error
                if time.monotonic() - self._last_result > stall:
                    missing = sorted(ids - self._results.keys())
                    raise StreamStalled(
                        f"no rollout result for {stall:.0f}s (transport.stall_timeout_s) at {self.endpoint.endpoint}; "
                        f"{len(missing)} prompt(s) missing (e.g. {missing[:3]}); workers: "
                        f"{self.endpoint.describe_workers()}. Fix: start or restart `spark-mcore rollout-worker "
                        f"--connect {self.endpoint.endpoint} --config RUN.yaml`, or raise transport.stall_timeout_s")
                self._arrived.wait(0.1)

    def weights_pushed(self, version: int) -> None:
        with self._lock:
            self.endpoint.set_version(version)

    def state_dict(self) -> dict[str, Any]:
        """Prompt batches taken from the loader and not trained yet (JSON-serialisable)."""
        return {"batches": [[item_to_wire(i) for i in b] for b in self._batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-issues the saved batches (same sample ids: a late result from before the restart
        still counts once)."""
        if self._batches:
            raise RuntimeError("StreamSource.load_state_dict: call before the first collect")
        for b in state.get("batches", []):
            items = [item_from_wire(d, "source.batches[]") for d in b]
            with self._lock:
                self.endpoint.submit(items)
            self._batches.append(items)

    def close(self) -> None:
        self._stop.set()
        self._pump_thread.join(timeout=5)
        with self._lock:
            self.endpoint.close()


class RankZeroSource:
    """More than one trainer rank: global rank 0 runs `inner` (the stream source: one endpoint
    per run), and every rank gets the same StepRollouts, broadcast as msgpack bytes in a tensor
    over the default group (records, not pickles). Other ranks pass inner=None.

    The division over DP replicas is the in-process path's (`rollout.divide.DividedRollout`):
    every rank holds the whole step in the same order, because each builds the same GRPO batch
    (group advantages, zero-variance filter, update split) and the same SPARK cache from it;
    `train.update` then trains DP rank d on `dp_slice(batch, d, dp_size)` (TP/PP peers of a
    replica train the same slice). Generation needs no division here: the workers do it.
    Tested at DP2 and TP2 in tests/integration/test_stream_ranks.py."""

    def __init__(self, inner: RolloutSource | None, rank: int, device: Any = "cpu") -> None:
        if (rank == 0) != (inner is not None):
            raise ValueError("RankZeroSource: rank 0 (and only rank 0) passes the inner source")
        self.inner, self.rank, self.device = inner, rank, device

    def collect(self, request: StepRequest) -> StepRollouts:
        from spark_mcore.distributed.collectives import broadcast_packed
        from spark_mcore.transport.records import (
            group_from_wire,
            group_to_wire,
            reward_sample_from_wire,
            reward_sample_to_wire,
        )

        wire = None
        if self.inner is not None:
            step = self.inner.collect(request)
            wire = {"groups": [group_to_wire(g) for g in step.groups], "metrics": step.metrics,
                    "off_policy": step.off_policy,
                    "candidates": None if step.candidates is None else
                    [[reward_sample_to_wire(s) for s in c] for c in step.candidates]}
        wire = broadcast_packed(wire, 0, None, self.device)
        if self.inner is not None:
            return step
        cands = wire["candidates"]
        return StepRollouts([group_from_wire(g) for g in wire["groups"]],
                            None if cands is None else [[reward_sample_from_wire(s) for s in c] for c in cands],
                            dict(wire["metrics"]), bool(wire["off_policy"]))

    def weights_pushed(self, version: int) -> None:
        if self.inner is not None:
            self.inner.weights_pushed(version)

    def prefetch(self, policy: bool, reward_prompts: list[Prompt]) -> None:
        if self.inner is not None:
            self.inner.prefetch(policy, reward_prompts)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


__all__ = ["RankZeroSource", "RolloutSource", "StepRequest", "StepRollouts", "InProcessSource", "StreamSource"]
