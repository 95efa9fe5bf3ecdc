"""Fault 8: each pipeline stage's sender advertises an address of its own node."""

from __future__ import annotations

from spark_mcore.weights.addresses import can_bind, sender_address, stage_port


def test_node_address_wins_and_a_foreign_address_is_replaced() -> None:
    local = {"10.0.0.1"}
    bind = local.__contains__
    # stage 0 on node 0, stage 1 on node 1: the launch scripts export each node's address
    assert sender_address("10.0.0.1", {"SPARK_NODE_ADDR": "10.0.0.1"}, bind) == "10.0.0.1"
    assert sender_address("10.0.0.1", {"SPARK_NODE_ADDR": "10.0.0.2"}, bind) == "10.0.0.2"
    # without it, a configured address of another host is not advertised
    assert sender_address("10.0.0.9", {}, bind, host_address=lambda: "10.0.0.1") == "10.0.0.1"
    assert sender_address("10.0.0.1", {}, bind, host_address=lambda: "unused") == "10.0.0.1"
    assert sender_address("auto", {}, bind, host_address=lambda: "10.0.0.3") == "10.0.0.3"


def test_ports_per_stage_and_real_binding() -> None:
    assert [stage_port(29600, s) for s in range(3)] == [29600, 29601, 29602]
    assert stage_port(0, 2) == 0
    assert can_bind("127.0.0.1") and not can_bind("192.0.2.123")  # TEST-NET-1 is never local


def test_one_sender_per_stage_under_context_parallelism() -> None:
    """dp_rank excludes CP, so CP ranks share dp_rank 0: only cp_rank 0 may send (fault 6)."""
    from types import SimpleNamespace

    import pytest

    from spark_mcore.weights.config import WeightSyncConfig
    from spark_mcore.weights.megatron_sync import MegatronWeightSync
    from spark_mcore.weights.sync import WeightSyncError

    ps = SimpleNamespace(rank=1, tp_rank=0, dp_rank=0, cp_rank=1, pp_rank=0, pp_size=1)
    assert not MegatronWeightSync(WeightSyncConfig(), adapter=None, ps=ps).is_sender
    with pytest.raises(WeightSyncError, match="sends stage 0"):
        MegatronWeightSync(WeightSyncConfig(), adapter=None, ps=SimpleNamespace(**{**vars(ps), "cp_rank": 0}))
