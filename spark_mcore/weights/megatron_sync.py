"""Weight sync driven by all ranks of a Megatron trainer (any TP / PP / DP layout).

Roles: the sender of pipeline stage s is its rank with tp_rank 0 and dp_rank 0; it owns the
weight-update group "<group_name>" (pp = 1) or "<group_name>_pp<s>" with every server rank.
The other TP ranks of dp replica 0 only take part in their stage's TP gathers; other DP
replicas hold the same weights and do nothing. The stage-0 sender coordinates the servers
(pause / flush / session / resume).

The stage sender depends on `weights.mode` (`stage_sender`): "distributed" = BucketSender (a
weight-update group per stage, one NCCL/gloo broadcast per bucket), "colocated" =
ColocatedSender (CUDA IPC handles through /update_weights_from_tensor). This is the one
weight-sync path to SGLang servers; spark_mcore.engines checks before a run builds anything
that the mode can run there.

Stages take turns (a barrier over the senders' PP group between turns): an SGLang server
handles one weight request at a time, so two stages feeding two servers concurrently could
each leave a server waiting inside the other stage's group - a deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from spark_mcore.sglang.client import SGLangClient
from spark_mcore.weights.bucket import WIRE_DTYPES
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.export import drain, iter_hf_weights
from spark_mcore.weights.server_calls import ServerCalls
from spark_mcore.weights.sync import (
    BucketSender,
    SyncStats,
    WeightSyncError,
    begin_update,
    end_update,
    end_update_after_failure,
)

logger = logging.getLogger(__name__)


def stage_group_name(base: str, pp_rank: int, pp_size: int) -> str:
    return base if pp_size == 1 else f"{base}_pp{pp_rank}"


def stage_sender(config: WeightSyncConfig, group_name: str, stage: int = 0) -> Any:
    """The sender of one pipeline stage for `config.mode` (connect(client), send(calls, named,
    version) -> SyncStats, close())."""
    if config.mode == "colocated":
        from spark_mcore.weights.colocated import ColocatedSender  # torch.multiprocessing reductions

        return ColocatedSender(config, group_name)
    return BucketSender(config, group_name, stage)


class MegatronWeightSync:
    """Call `connect()` once and `sync(models, version)` after each optimizer step, on EVERY
    trainer rank (collective). Senders need an SGLangClient for the servers (`client`)."""

    def __init__(self, config: WeightSyncConfig, adapter: Any, ps: Any, client: SGLangClient | None = None) -> None:
        """`adapter`: model-family adapter bound to the ModelConfig; `ps`: ParallelState
        (tp/pp/dp ranks and sizes, tp_group, pp_group)."""
        self.config, self.adapter, self.ps = config, adapter, ps
        # one sender per stage: dp_rank excludes context parallelism, so CP ranks share it (fault 6)
        self.is_sender = ps.tp_rank == 0 and ps.dp_rank == 0 and getattr(ps, "cp_rank", 0) == 0
        self.is_coordinator = self.is_sender and ps.pp_rank == 0
        if self.is_sender and client is None:
            raise WeightSyncError(f"rank {ps.rank} sends stage {ps.pp_rank}'s weights: pass client=SGLangClient("
                                  "attach_servers(urls), cfg) on tp_rank 0 / dp_rank 0 ranks")
        self.client = client
        self.calls = ServerCalls(client) if client is not None else None
        self.sender = stage_sender(config, stage_group_name(config.group_name, ps.pp_rank, ps.pp_size), ps.pp_rank) \
            if self.is_sender else None
        self.policy_version = 0
        self.last: SyncStats | None = None

    def _in_turns(self, fn: Callable[[], None]) -> None:
        """Senders run `fn` stage by stage; an error is raised after the turns so no stage hangs."""
        error: BaseException | None = None
        for stage in range(self.ps.pp_size):
            if stage == self.ps.pp_rank:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001  (re-raised below, after the barrier)
                    error = e
            if self.ps.pp_size > 1:
                dist.barrier(group=self.ps.pp_group)
        if error is not None:
            raise error

    def connect(self) -> None:
        """Senders form their stage's weight-update group with all servers (stage by stage)."""
        if self.sender is not None:
            self._in_turns(lambda: self.sender.connect(self.client))

    def _export(self, models: torch.nn.Module | Sequence[torch.nn.Module], emit: bool) -> Any:
        return iter_hf_weights(models, self.adapter, self.ps.tp_group, self.ps.tp_size, emit=emit,
                               wire_dtype=WIRE_DTYPES[self.config.wire_dtype],
                               gather_bucket_bytes=self.config.gather_bucket_bytes)

    def sync(self, models: torch.nn.Module | Sequence[torch.nn.Module], version: int) -> SyncStats | None:
        """Push this policy to the servers and tag it `version` (collective on all ranks).

        Returns the sender's stats (None on other ranks). Generation is paused for the duration.
        """
        if self.ps.dp_rank != 0:
            self.policy_version = version
            return None
        if not self.is_sender:
            drain(self._export(models, emit=False))
            self.policy_version = version
            return None
        assert self.calls is not None and self.sender is not None
        begin_error: Exception | None = None
        if self.is_coordinator:
            try:
                begin_update(self.calls, self.config, pause=True)
            except Exception as e:  # noqa: BLE001  (raised in stage 0's turn: the other stages must not hang)
                begin_error = e
        stats: list[SyncStats] = []
        try:
            self._in_turns(lambda: stats.append(self._send_stage(models, version, begin_error)))
        except BaseException:
            if self.is_coordinator:
                end_update_after_failure(self.calls, self.config, resume=True)
            raise
        if self.is_coordinator:
            end_update(self.calls, self.config, resume=True)
        self.policy_version = version
        self.last = stats[0]
        logger.info("weight sync v%d stage %d: %d buckets, %.1f MB in %.2fs (%.2f GB/s)", version, self.ps.pp_rank,
                    self.last.buckets, self.last.bytes / 1e6, self.last.seconds, self.last.gbps)
        return self.last

    def _send_stage(self, models: torch.nn.Module | Sequence[torch.nn.Module], version: int,
                    begin_error: Exception | None) -> SyncStats:
        """This stage's turn on its sender; on failure the export is still run to the end, since
        the stage's other TP ranks are inside its all-gathers."""
        export = self._export(models, emit=True)
        try:
            if begin_error is not None:
                raise begin_error
            return self.sender.send(self.calls, export, version)
        except BaseException:
            drain(export)
            raise

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.calls is not None:
            self.calls.close()


__all__ = ["MegatronWeightSync", "stage_group_name", "stage_sender"]
