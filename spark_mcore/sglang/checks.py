"""What a running SGLang server reports (GET /get_server_info: its ServerArgs fields plus
scheduler info) checked against our config: the GPUs per server that size the weight-update
group (fault 10: `sglang.gpus_per_server` was never checked), and whether sampling seeds are
honoured (SGLang ignores them unless started with --enable-deterministic-inference)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from spark_mcore.config.loader import ConfigError
from spark_mcore.sglang.config import DETERMINISTIC_FLAG

logger = logging.getLogger(__name__)


def server_gpus(info: Mapping[str, Any]) -> int:
    """Ranks a server brings to the weight-update group: tp_size x pp_size (SGLang's model
    workers; data-parallel attention shares the TP ranks)."""
    return int(info.get("tp_size", 1) or 1) * int(info.get("pp_size", 1) or 1)


def check_gpus_per_server(infos: Sequence[tuple[str, Mapping[str, Any]]], gpus_per_server: int) -> None:
    """Raises ConfigError naming sglang.gpus_per_server when a server runs another size: the
    group's world size and rank offsets would be wrong and its init would hang."""
    wrong = [(url, server_gpus(info)) for url, info in infos if server_gpus(info) != gpus_per_server]
    if wrong:
        url, got = wrong[0]
        raise ConfigError(f"sglang.gpus_per_server={gpus_per_server}, but {url} runs tp_size x pp_size = {got} "
                          f"GPU(s) (GET /get_server_info); set sglang.gpus_per_server={got}")


def honours_seeds(info: Mapping[str, Any]) -> bool:
    return bool(info.get("enable_deterministic_inference", False))


def warn_if_seeds_ignored(infos: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """URLs of servers that will ignore per-request sampling seeds (logged once here)."""
    urls = [url for url, info in infos if not honours_seeds(info)]
    if urls:
        logger.warning("sglang: %s run without %s: per-request sampling seeds are ignored, so rollouts are not "
                       "reproducible (set sglang.deterministic=true to launch with it; slower)",
                       ", ".join(urls), DETERMINISTIC_FLAG)
    return urls


def check_servers(infos: Sequence[tuple[str, Mapping[str, Any]]], gpus_per_server: int) -> None:
    """Both checks, on what GET /get_server_info returned per server."""
    check_gpus_per_server(infos, gpus_per_server)
    warn_if_seeds_ignored(infos)
