"""Colocated (CUDA IPC) payload on CPU: its records rebuild the bucket exactly as SGLang 0.5.23's
flattened_bucket loader does (fields of FlattenedTensorMetadata); the IPC transfer itself is
tested in tests/gpu/test_weights_gpu.py."""

from __future__ import annotations

import pytest
import torch

from spark_mcore.sglang.client import SGLangClient, SGLangConfig, attach_servers
from spark_mcore.weights.bucket import pack_bucket
from spark_mcore.weights.colocated import ColocatedSender, ipc_payload
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.server_calls import ServerCalls, tensor_update_body
from spark_mcore.weights.sync import WeightSyncError


def test_ipc_payload_records_rebuild_the_tensors() -> None:
    named = [("w", torch.arange(6, dtype=torch.float32).view(2, 3)), ("b", torch.tensor([0.5, -1.25]))]
    header, flat = pack_bucket(named, wire_dtype=torch.bfloat16)
    payload = ipc_payload(header, flat)
    assert payload["flattened_tensor"] is flat
    metas = payload["metadata"]
    assert [vars(m) for m in metas] == [
        {"name": "w", "shape": torch.Size([2, 3]), "dtype": torch.bfloat16, "start_idx": 0, "end_idx": 12, "numel": 12},
        {"name": "b", "shape": torch.Size([2]), "dtype": torch.bfloat16, "start_idx": 12, "end_idx": 16, "numel": 4}]
    # SGLang: flattened[start_idx:end_idx].view(dtype).reshape(shape)
    rebuilt = {m.name: flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape) for m in metas}
    for name, t in named:
        assert torch.equal(rebuilt[name], t.to(torch.bfloat16))


def test_tensor_update_body_is_base64_per_rank_with_load_format() -> None:
    body = tensor_update_body([b"\x00\x01", b"\x02"], version=4)
    assert body == {"serialized_named_tensors": ["AAE=", "Ag=="], "flush_cache": False, "weight_version": "4",
                    "load_format": "flattened_bucket"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_colocated_needs_cuda() -> None:
    client = SGLangClient(attach_servers(["http://127.0.0.1:9"]), SGLangConfig())
    calls = ServerCalls(client)
    try:
        with pytest.raises(WeightSyncError, match="needs CUDA"):
            ColocatedSender(WeightSyncConfig(mode="colocated")).send(calls, [("w", torch.zeros(2))], version=1)
    finally:
        calls.close()
        client.close()
