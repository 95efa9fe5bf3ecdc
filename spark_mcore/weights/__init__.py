"""Weight sync: gather shards, HF names, flat buckets, broadcast / IPC.

    config.py         WeightSyncConfig (weights.mode: distributed | colocated)
    bucket.py         flat bucket layout (SGLang's FlattenedTensorBucket), msgpack header, streaming packer
    export.py         HF-named full tensors from a Megatron model (TP gather per bucket, PP global names)
    groups.py         the weight-update process group (SGLang's rendezvous), gloo or NCCL
    server_calls.py   weight-update HTTP calls to every live server of an SGLangClient
    sync.py           BucketSender (one broadcast per bucket + HTTP announce), sync_once
    colocated.py      ColocatedSender: CUDA IPC through /update_weights_from_tensor
    megatron_sync.py  MegatronWeightSync: THE sync path, all trainer ranks, any TP/PP/DP layout, any mode

The receiving side of a broadcast lives with the CPU twin of SGLang (spark_mcore.twin.receiver).
Import the submodules directly: this init imports nothing so `weights.config` stays cheap.
"""
