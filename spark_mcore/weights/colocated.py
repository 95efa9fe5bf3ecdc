"""Colocated weight sync: trainer and SGLang share GPUs, weights go by CUDA IPC handle.

Each bucket is packed into a CUDA buffer and announced with /update_weights_from_tensor
(load_format="flattened_bucket"): the body carries, per server TP rank, a serialized
{"flattened_tensor": <CUDA uint8 bucket>, "metadata": [per-tensor records]}. The tensor is
reduced with `torch.multiprocessing.reductions.reduce_tensor` (through ForkingPickler), which
sends an IPC handle to the GPU memory, not the bytes; the server maps the buffer, rebuilds
the tensors from the records (name, shape, dtype, start_idx, end_idx, numel - SGLang's
FlattenedTensorMetadata fields, sent as SimpleNamespace, a type SGLang's restricted
unpickler accepts) and copies them into its weights before it answers.

This is the one place where we PRODUCE a pickle, because SGLang's endpoint takes nothing
else; we never unpickle anything (the CPU twin rejects this endpoint). The buffer must
stay alive and unmodified until the server has answered, so buckets go one at a time per
buffer (two buffers alternate). Needs CUDA; tested in tests/gpu/test_weights_gpu.py.

Limitation: a single sender (the stage's tp_rank 0) serves every server TP rank from its
own GPU; per-GPU senders (each server rank reading from the trainer rank on its own GPU)
are not implemented.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace

import torch

from spark_mcore.sglang.client import SGLangClient, SGLangError
from spark_mcore.weights.bucket import DTYPES, WIRE_DTYPES, BucketHeader, iter_buckets
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.ipc_device import dumps_with_device_uuids
from spark_mcore.weights.server_calls import ServerCalls, tensor_update_body
from spark_mcore.weights.sync import SyncStats, WeightSyncError


def ipc_payload(header: BucketHeader, flat: torch.Tensor) -> dict[str, object]:
    """The object SGLang's flattened_bucket loader expects: the CUDA bucket and its records."""
    meta = [SimpleNamespace(name=t.name, shape=torch.Size(t.shape), dtype=DTYPES[t.dtype], start_idx=t.offset,
                            end_idx=t.offset + t.nbytes, numel=t.nbytes) for t in header.tensors]
    return {"flattened_tensor": flat, "metadata": meta}


def serialize_for_ipc(obj: object) -> bytes:
    """ForkingPickler bytes of `obj`; CUDA tensors inside become IPC handles that name their GPU
    by UUID, as SGLang's patched rebuild expects (`spark_mcore.weights.ipc_device`): a server
    whose CUDA_VISIBLE_DEVICES differs from the trainer's still opens the right GPU."""
    return dumps_with_device_uuids(obj)


class ColocatedSender:
    """The stage sender of weights.mode=colocated (see MegatronWeightSync): no process group,
    each bucket goes as CUDA IPC handles, one serialized blob per server TP rank.

    server_tp_size: TP ranks per server (one blob each); default client.config.gpus_per_server.
    """

    def __init__(self, config: WeightSyncConfig, group_name: str | None = None,
                 server_tp_size: int | None = None) -> None:
        self.config = config
        self.server_tp_size = server_tp_size

    def connect(self, client: SGLangClient) -> None:
        """Nothing to form: IPC handles need no group (the servers share this machine's GPUs)."""

    def close(self) -> None:
        pass

    def send(self, calls: ServerCalls, named: Iterable[tuple[str, torch.Tensor]], version: int | None) -> SyncStats:
        if not torch.cuda.is_available():
            raise WeightSyncError("colocated weight sync needs CUDA (IPC handles); use weights.mode=distributed")
        tp = self.server_tp_size or calls.client.config.gpus_per_server
        stats, start = SyncStats(), time.perf_counter()
        device = torch.device("cuda", torch.cuda.current_device())
        for header, flat in iter_buckets(named, self.config.bucket_bytes, WIRE_DTYPES[self.config.wire_dtype],
                                         device, num_buffers=2, alone_bytes=self.config.alone_bytes):
            torch.cuda.current_stream().synchronize()  # the server reads on its own stream
            payload = ipc_payload(header, flat)
            # One serialization per server TP rank: each rank opens (and releases) its own handle.
            body = tensor_update_body([serialize_for_ipc(payload) for _ in range(tp)], version)
            try:
                calls.post("/update_weights_from_tensor", lambda k, h, b=body: b)[0].wait()
            except SGLangError as e:
                raise WeightSyncError(f"colocated weight update failed: {e}") from e
            stats.buckets, stats.tensors, stats.bytes = stats.buckets + 1, stats.tensors + len(header.tensors), \
                stats.bytes + header.nbytes
        stats.seconds = time.perf_counter() - start
        return stats


__all__ = ["ColocatedSender", "ipc_payload", "serialize_for_ipc"]
