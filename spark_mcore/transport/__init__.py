"""ZeroMQ stream: pickle-free wire format, record (de)serialisation, the producer/consumer pair,
and the trainer's assignment endpoint with its worker client.

The names below are loaded on first use (PEP 562), so that `spark_mcore.transport.config`
(read by the run config) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BackPressureTimeout": "stream", "ConsumerStats": "stream", "RolloutConsumer": "stream",
    "RolloutProducer": "stream", "StreamBatch": "stream",
    "SCHEMA_VERSION": "wire", "WireError": "wire", "decode": "wire", "encode": "wire",
    "StreamConfig": "config", "StreamEndpoint": "endpoint", "StreamStalled": "endpoint", "PromptTooLarge": "endpoint",
    "WorkerClient": "worker_client", "ResultTooLarge": "worker_client", "WorkItem": "protocol", "WorkResult": "protocol",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spark_mcore.transport' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spark_mcore.transport.{_EXPORTS[name]}"), name)
