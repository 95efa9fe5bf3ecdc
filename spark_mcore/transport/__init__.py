"""ZeroMQ stream: pickle-free wire format, record (de)serialisation, credit-based producer/consumer."""

from spark_mcore.transport.stream import (
    BackPressureTimeout,
    ConsumerStats,
    RolloutConsumer,
    RolloutProducer,
    StreamBatch,
)
from spark_mcore.transport.wire import SCHEMA_VERSION, WireError, decode, encode

__all__ = [
    "SCHEMA_VERSION", "WireError", "encode", "decode",
    "RolloutProducer", "RolloutConsumer", "StreamBatch", "ConsumerStats", "BackPressureTimeout",
]
