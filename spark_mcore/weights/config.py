from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spark_mcore.config.loader import ConfigError

MiB = 1024 * 1024
MODES = ("distributed", "colocated")  # the stage senders of spark_mcore.weights.megatron_sync.stage_sender


@dataclass
class WeightSyncConfig:
    """Trainer -> rollout weight transfer.

    mode: how weights reach SGLang servers (rollout.engine=sglang): "distributed" = NCCL/gloo
        broadcast to separate rollout servers (/init_weights_update_group +
        /update_weights_from_distributed); "colocated" = CUDA IPC handles through
        /update_weights_from_tensor (trainer and servers share GPUs: needs CUDA, and servers
        the user started on the trainer's GPUs, attached with sglang.urls). The in-process
        transformers engine (rollout.engine=hf) takes the weights directly in either mode.
    bucket_mb: size of one flat bucket (one collective each); tensors larger than this travel
        alone in a bucket of their own size.
    wire_dtype: dtype on the wire ("bf16" default; "fp32" for bitwise tests; "keep" = as trained).
    load_format: "flattened_bucket" = SGLang >= 0.5.x receives a whole bucket with one
        broadcast; "per_tensor" = SGLang's original protocol, one broadcast per tensor (only for
        servers without flattened_bucket support: much slower).
    weight_update_session: wrap updates in /begin_weight_update + /end_weight_update (required by
        SGLang 0.5.23; turn off for older servers that lack these endpoints).
    backend: "auto" = nccl with CUDA, gloo without.
    master_address / master_port: where the trainer's rendezvous store listens (rank 0 of the
        weight-update group); port 0 picks a free port. Must be reachable from the servers.
        Each pipeline stage's sender advertises an address of its own node: SPARK_NODE_ADDR
        when set (the launch scripts export it), else master_address when this host owns it,
        else this host's address ("auto" asks for that directly); a fixed port is offset by
        the stage (`spark_mcore.weights.addresses`).
    group_name: SGLang group name; with pipeline parallelism stage s uses "<group_name>_pp<s>".
    pause_mode: /pause_generation mode before a sync ("abort" lets the cache be flushed).
    timeout_s: rendezvous and collective timeout.
    gather_bucket_mb: parameters whose gathered size fits this go through one TP all-gather.
    alone_mb: a tensor of at least this size that is already in the wire dtype on the wire
        device is broadcast straight from its own memory, alone in its bucket (no copy), at
        once; the smaller tensors around it keep filling the open bucket. 0 = only tensors
        that fill a whole bucket.
    first_bucket_mb: distributed mode: the first bucket of a sync holds at most this, each next
        one twice the one before, up to bucket_mb (0 = every bucket bucket_mb). A bucket is packed
        while the previous one is on the wire, but the first one has nothing to hide behind: a
        small first bucket gets the wire going after a short copy instead of a full bucket's.
    keep_buffers: keep the two bucket buffers (2 x bucket_mb, on the wire device) between syncs
        instead of allocating them at every sync.
    pipeline_requests: send bucket k+1's update request as soon as every server joined bucket
        k's broadcast, so it waits on the server while k loads (no HTTP round trip between
        buckets); needs servers that serve weight updates one at a time in arrival order (SGLang
        and the CPU twin hold a lock for the whole request). False: wait for k's answer first.
        None (default) = on for gloo, off for nccl: an NCCL root's broadcast can complete once
        the data sits in the peer's buffers, before the server has joined the collective, so
        request k+1 could overtake request k (gloo's completion means the receiver took part,
        and there it is measured).
    """

    mode: str = "distributed"
    bucket_mb: float = 512.0
    wire_dtype: Literal["bf16", "fp16", "fp32", "keep"] = "bf16"
    load_format: Literal["flattened_bucket", "per_tensor"] = "flattened_bucket"
    weight_update_session: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    master_address: str = "127.0.0.1"
    master_port: int = 0
    group_name: str = "weight_update_group"
    pause_mode: Literal["abort", "retract", "in_place"] = "abort"
    timeout_s: float = 600.0
    gather_bucket_mb: float = 256.0
    alone_mb: float = 64.0
    first_bucket_mb: float = 16.0
    keep_buffers: bool = True
    pipeline_requests: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"weights.mode={self.mode!r} is unknown. Fix: set weights.mode to one of {list(MODES)}")
        if not self.bucket_mb > 0:
            raise ConfigError(f"weights.bucket_mb={self.bucket_mb} must be > 0 (default 512)")
        if self.alone_mb < 0:
            raise ConfigError(f"weights.alone_mb={self.alone_mb} must be >= 0 (0 = whole-bucket tensors only)")
        if self.first_bucket_mb < 0:
            raise ConfigError(f"weights.first_bucket_mb={self.first_bucket_mb} must be >= 0 (0 = no ramp)")
        if not self.gather_bucket_mb > 0:
            raise ConfigError(f"weights.gather_bucket_mb={self.gather_bucket_mb} must be > 0 (default 256)")
        if not 0 <= self.master_port < 65536:
            raise ConfigError(f"weights.master_port={self.master_port} must be in 0..65535 (0 = free port)")
        if not self.master_address:
            raise ConfigError("weights.master_address: set the trainer host/IP the rollout servers can reach")
        if not self.group_name:
            raise ConfigError("weights.group_name must be a non-empty string")
        if self.timeout_s <= 0:
            raise ConfigError(f"weights.timeout_s={self.timeout_s} must be > 0")
        if self.pause_mode == "in_place":
            raise ConfigError("weights.pause_mode='in_place' keeps the KV cache, so the flush before a sync "
                              "fails; use 'abort' or 'retract'")

    def resolved_pipeline_requests(self, backend: str) -> bool:
        """pipeline_requests with None resolved for the group's backend (see the field)."""
        return self.pipeline_requests if self.pipeline_requests is not None else backend == "gloo"

    @property
    def bucket_bytes(self) -> int:
        return max(1, int(self.bucket_mb * MiB))

    @property
    def alone_bytes(self) -> int | None:
        return int(self.alone_mb * MiB) if self.alone_mb > 0 else None

    @property
    def first_bucket_bytes(self) -> int | None:
        return max(1, int(self.first_bucket_mb * MiB)) if self.first_bucket_mb > 0 else None

    @property
    def gather_bucket_bytes(self) -> int:
        return max(1, int(self.gather_bucket_mb * MiB))
