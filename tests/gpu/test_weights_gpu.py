"""CUDA paths of the weight sync (skipped without CUDA).

* colocated: a bucket serialized by `serialize_for_ipc` is opened in ANOTHER process the way
  SGLang's flattened_bucket loader does (restricted unpickler admitting only torch's rebuild
  functions, torch types and SimpleNamespace - the subset of SGLang 0.5.23's SafeUnpickler
  allow-list our payload needs), and its tensors equal the sender's bit for bit.
* NCCL: BucketSender -> receive_bucket over a 2-GPU weight-update group (needs 2 GPUs).
"""

from __future__ import annotations

import io
import pickle
import queue
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_ALLOWED = {("torch.multiprocessing.reductions", "rebuild_cuda_tensor"), ("torch", "Tensor"), ("torch", "Size"),
            ("torch", "bfloat16"),
            ("torch", "float32"), ("torch", "uint8"), ("types", "SimpleNamespace"), ("torch", "UntypedStorage"),
            ("torch.storage", "UntypedStorage"), ("torch._utils", "_rebuild_tensor_v2"), ("builtins", "dict"),
            ("builtins", "list"), ("collections", "OrderedDict"), ("torch", "device"), ("torch", "dtype")}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"blocked {module}.{name}")
        return super().find_class(module, name)


def _patch_rebuild_like_sglang() -> None:
    """SGLang's monkey_patch_torch_reductions: the device arrives as a UUID (asserted) and is
    mapped to this process's index, whatever its CUDA_VISIBLE_DEVICES."""
    from torch.multiprocessing import reductions

    original = reductions.rebuild_cuda_tensor

    def rebuild(*args: Any) -> Any:
        uuid = args[6]
        assert isinstance(uuid, str), "the sender did not send a device UUID"
        index = next(i for i in range(torch.cuda.device_count())
                     if str(torch.cuda.get_device_properties(i).uuid) == uuid)
        return original(*args[:6], index, *args[7:])

    reductions.rebuild_cuda_tensor = rebuild


def _open_bucket(blob: bytes, out: Any) -> None:
    """Receiver process: rebuild the tensors from the IPC bucket, report checksums."""
    _patch_rebuild_like_sglang()
    obj = _Restricted(io.BytesIO(blob)).load()
    flat = obj["flattened_tensor"]
    tensors = {m.name: flat[m.start_idx:m.end_idx].view(m.dtype).view(m.shape) for m in obj["metadata"]}
    out.put({n: (str(t.dtype), list(t.shape), t.float().sum().item(), t.view(-1)[:4].float().tolist())
             for n, t in tensors.items()})


def test_ipc_bucket_opens_in_another_process() -> None:
    from spark_mcore.weights.bucket import pack_bucket
    from spark_mcore.weights.colocated import ipc_payload, serialize_for_ipc

    torch.manual_seed(0)
    named = [("w", torch.randn(64, 32, device="cuda")), ("b", torch.randn(32, device="cuda"))]
    header, flat = pack_bucket(named, wire_dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    blob = serialize_for_ipc(ipc_payload(header, flat))
    assert len(blob) < 4096  # a handle, not the 4 KiB of data
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_open_bucket, args=(blob, out))
    proc.start()
    try:
        got = out.get(timeout=120)
    finally:
        proc.join(30)
    assert proc.exitcode == 0
    for name, t in named:
        want = t.to(torch.bfloat16)
        dtype, shape, total, head = got[name]
        assert dtype == "torch.bfloat16" and shape == list(t.shape)
        assert total == want.float().sum().item() and head == want.view(-1)[:4].float().tolist()


def _nccl_worker(rank: int, port_q: Any, out: Any) -> None:
    from spark_mcore.sglang.client import PendingCalls
    from spark_mcore.twin.receiver import receive_bucket
    from spark_mcore.weights.bucket import plan_buckets
    from spark_mcore.weights.config import WeightSyncConfig
    from spark_mcore.weights.groups import create_master_store, join_weight_update_group
    from spark_mcore.weights.sync import BucketSender

    torch.cuda.set_device(rank)
    shapes = [(f"t{i}", (256, 128 + i)) for i in range(12)]
    cfg = WeightSyncConfig(bucket_mb=0.2, wire_dtype="fp32", backend="nccl")
    if rank == 0:
        store = create_master_store("127.0.0.1", 0, 2, 120)
        port_q.put(store.port)
        group = join_weight_update_group("127.0.0.1", store.port, 0, 2, "g", "nccl", 120, store=store)
        torch.manual_seed(0)
        named = [(n, torch.randn(s, device="cuda")) for n, s in shapes]

        class NoHTTP:
            def post(self, path: str, body_for: Any, retry: bool = True) -> Any:
                return PendingCalls([]), []

        sender = BucketSender(cfg, "g")
        sender.group = group
        sender.send(NoHTTP(), named, version=1)  # type: ignore[arg-type]
        out.put({n: t.sum().item() for n, t in named})
    else:
        group = join_weight_update_group("127.0.0.1", port_q.get(), 1, 2, "g", "nccl", 120)
        got = {}
        for h in plan_buckets([(n, torch.float32, s) for n, s in shapes], cfg.bucket_bytes, cfg.alone_bytes,
                              first_bucket_bytes=cfg.first_bucket_bytes):
            got.update({n: t.sum().item() for n, t in receive_bucket(group, h)})
        out.put(got)
    torch.cuda.synchronize()
    group.destroy()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="an NCCL broadcast needs 2 GPUs")
def test_nccl_bucket_broadcast_two_gpus() -> None:
    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_nccl_worker, args=(r, port_q, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=300) for _ in range(2)]
    except queue.Empty:
        pytest.fail("NCCL workers did not report")
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.terminate()
    assert results[0] == results[1] and len(results[0]) == 12
