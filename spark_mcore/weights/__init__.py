"""Weight sync: gather shards, HF names, flat buckets, broadcast / IPC, receivers.

    config.py         WeightSyncConfig
    bucket.py         flat bucket layout (SGLang's FlattenedTensorBucket), msgpack header, streaming packer
    export.py         HF-named full tensors from a Megatron model (TP gather per bucket, PP global names)
    groups.py         the weight-update process group (SGLang's rendezvous), gloo or NCCL
    sync.py           BucketSender (one broadcast per bucket + HTTP announce), BucketWeightSync hook
    megatron_sync.py  MegatronWeightSync: all trainer ranks, any TP/PP/DP layout
    colocated.py      CUDA IPC path through /update_weights_from_tensor
    receiver.py       receive_bucket / load_into (test server, benchmarks)
    registry.py       build_weight_sync(config): WeightSync hooks by mode (distributed, colocated)
"""

from spark_mcore.weights.bucket import (
           BucketError,
           BucketHeader,
           TensorSpec,
           iter_buckets,
           pack_bucket,
           unpack_bucket,
)
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.groups import WeightUpdateGroup, create_master_store, join_weight_update_group

__all__ = ["BucketError", "BucketHeader", "TensorSpec", "iter_buckets", "pack_bucket", "unpack_bucket",
           "WeightSyncConfig", "WeightUpdateGroup", "create_master_store", "join_weight_update_group"]
