"""Fault 2 (NCCL mismatch message) and fault 10 (IPC device by UUID) on CPU."""

from __future__ import annotations

import pickle

import torch

from spark_mcore.weights.ipc_device import DEVICE_ARG, dumps_with_device_uuids, with_device_uuid
from spark_mcore.weights.nccl_check import explain_group_failure


def test_nccl_mismatch_is_explained() -> None:
    err = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage, NCCL version 2.21.5\n"
                       "Last error: Mismatched NCCL version detected : rank 0 version 22105 rank 1 version 22703")
    msg = explain_group_failure(err, "nccl", "2.21.5")
    assert msg.startswith("NCCL versions differ between the trainer (NCCL 2.21.5)") and "SHARED_NCCL" in msg
    other = explain_group_failure(TimeoutError("store timeout"), "nccl", None)
    assert "store timeout" in other and "NCCL unknown" in other
    assert explain_group_failure(TimeoutError("x"), "gloo", None) == "x"


def test_device_index_becomes_uuid() -> None:
    args = tuple(range(15))
    out = with_device_uuid(args, lambda i: f"GPU-{i}")
    assert out[DEVICE_ARG] == f"GPU-{DEVICE_ARG}" and out[:DEVICE_ARG] == args[:DEVICE_ARG]
    assert out[DEVICE_ARG + 1:] == args[DEVICE_ARG + 1:] and len(out) == len(args)
    assert with_device_uuid(out, lambda i: "never") == out  # already a UUID


def test_cpu_tensors_pickle_unchanged() -> None:
    """Only CUDA tensors get the UUID treatment; the rest round-trips as ForkingPickler would."""
    obj = {"t": torch.arange(4), "meta": [1, "a"]}
    back = pickle.loads(dumps_with_device_uuids(obj))
    assert torch.equal(back["t"], obj["t"]) and back["meta"] == [1, "a"]
