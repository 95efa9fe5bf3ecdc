"""Context parallelism's load-balanced split (hand-written layouts), its inverse, the CPU
version of megatron's rotary slicing (shim 9), and the config-time rules."""

from __future__ import annotations

import pytest
import torch

from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.context_parallel import cp_positions, split_for_cp, unsplit_from_cp
from spark_mcore.distributed.cpu_shims import pos_emb_on_this_cp_rank_cpu


def test_positions_are_megatrons_load_balanced_chunks() -> None:
    # C = 2, T = 8: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    # C = 3, T = 6: chunks of 1; rank r holds r and 5 - r
    assert [cp_positions(6, 3, r).tolist() for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    with pytest.raises(ValueError, match="multiple of 2 \\* cp_size = 4"):
        cp_positions(10, 2, 0)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_unsplit_is_the_identity(cp: int) -> None:
    x = torch.arange(3 * 16 * 2).view(3, 16, 2)
    parts = [split_for_cp(x, cp, r, dim=1) for r in range(cp)]
    assert all(p.shape == (3, 16 // cp, 2) for p in parts)
    assert torch.equal(unsplit_from_cp(parts, dim=1), x)
    # every position lands on exactly one rank
    assert sorted(torch.cat([cp_positions(16, cp, r) for r in range(cp)]).tolist()) == list(range(16))


class _Group:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_rotary_slice_matches_the_token_split() -> None:
    emb = torch.arange(8.0).view(8, 1, 1, 1)  # [s, 1, 1, dim] as megatron's rotary embedding
    for rank in range(2):
        got = pos_emb_on_this_cp_rank_cpu(emb, 0, _Group(2, rank)).flatten().tolist()
        assert got == cp_positions(8, 2, rank).float().tolist()


def test_cp_rules_at_config_time() -> None:
    from spark_mcore.config.run import load_run_config

    with pytest.raises(ConfigError, match="set model.attention=sdpa"):
        load_run_config(None, ["parallel.cp=2", "model.attention=megatron", "model.transformer_impl=local"])
    assert load_run_config(None, ["parallel.cp=2", "model.attention=auto"]).parallel.cp == 2
