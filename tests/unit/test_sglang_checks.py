"""gpus_per_server against /get_server_info, and the seed note (fault 10)."""

from __future__ import annotations

import logging

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.sglang.checks import check_gpus_per_server, server_gpus, warn_if_seeds_ignored


def test_gpus_per_server_must_match_the_server() -> None:
    infos = [("http://a:30000", {"tp_size": 2, "pp_size": 1}), ("http://b:30000", {"tp_size": 2})]
    check_gpus_per_server(infos, 2)
    with pytest.raises(ConfigError, match=r"sglang.gpus_per_server=1, but http://a:30000 runs .* = 2 .*set "
                                          r"sglang.gpus_per_server=2"):
        check_gpus_per_server(infos, 1)
    assert server_gpus({"tp_size": 4, "pp_size": 2, "dp_size": 2}) == 8


def test_seed_note(caplog) -> None:
    infos = [("http://a:1", {"enable_deterministic_inference": True}), ("http://b:1", {})]
    with caplog.at_level(logging.WARNING):
        assert warn_if_seeds_ignored(infos) == ["http://b:1"]
    assert "--enable-deterministic-inference" in caplog.text
