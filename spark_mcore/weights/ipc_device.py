"""CUDA IPC handles that name their GPU by UUID (colocated weight sync, fault 10).

torch's `reduce_tensor` records the sender's device *index*; a receiver with another
CUDA_VISIBLE_DEVICES maps that index to another GPU. SGLang patches torch's reductions so
that the device travels as its UUID (`monkey_patch_torch_reductions` in sglang/srt, pending
pytorch#149248) and its rebuild asserts it received a string. So our sender writes the UUID in
the same argument slot, with a per-pickler reducer (torch's global reductions stay untouched).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
from torch.multiprocessing import reductions

# position of the device in rebuild_cuda_tensor's arguments (torch/multiprocessing/reductions.py,
# unchanged for years; SGLang relies on the same index)
DEVICE_ARG = 6


def with_device_uuid(args: tuple[Any, ...], uuid_of: Callable[[int], str]) -> tuple[Any, ...]:
    """rebuild_cuda_tensor arguments with the device index replaced by its UUID string."""
    device = args[DEVICE_ARG]
    if isinstance(device, str):
        return args
    return (*args[:DEVICE_ARG], uuid_of(int(device)), *args[DEVICE_ARG + 1:])


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_tensor_with_uuid(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    fn, args = reductions.reduce_tensor(tensor)
    if fn is reductions.rebuild_cuda_tensor:
        args = with_device_uuid(args, device_uuid)
    return fn, args


def dumps_with_device_uuids(obj: object) -> bytes:
    """ForkingPickler bytes of `obj`: CUDA tensors become IPC handles whose device is a UUID."""
    reductions.init_reductions()
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    table = dict(pickler.dispatch_table)
    for cls in (torch.Tensor, torch.nn.Parameter):
        table[cls] = _reduce_tensor_with_uuid
    pickler.dispatch_table = table
    pickler.dump(obj)
    return buf.getvalue()
