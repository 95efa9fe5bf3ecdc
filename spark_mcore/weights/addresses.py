"""Where each pipeline stage's sender listens for its weight-update group (fault 8).

With pipeline parallelism over several nodes, stage s's sender runs on its own node and must
advertise an address of that node; every stage used to advertise the one
`weights.master_address`, which on any other node cannot be bound (and servers would dial the
wrong host). Order of precedence for a sender:
  1. SPARK_NODE_ADDR (the launch scripts export this node's address),
  2. weights.master_address, when this host can bind it,
  3. this host's address (hostname lookup), with a warning when 2 was set but not local.
A fixed weights.master_port is offset by the stage (s), so stages sharing a node do not collide.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def can_bind(address: str) -> bool:
    """Whether this host owns `address` (binding an ephemeral TCP port there succeeds)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def this_host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def sender_address(configured: str, env: Mapping[str, str] | None = None,
                   bindable: Callable[[str], bool] = can_bind,
                   host_address: Callable[[], str] = this_host_address) -> str:
    env = os.environ if env is None else env
    node = env.get("SPARK_NODE_ADDR", "").strip()
    if node:
        return node
    if configured != "auto" and bindable(configured):
        return configured
    found = host_address()
    if configured != "auto":
        logger.warning("weights.master_address=%s is not an address of this host; this stage's sender "
                       "advertises %s instead (set SPARK_NODE_ADDR per node to choose)", configured, found)
    return found


def stage_port(port: int, pp_rank: int) -> int:
    """0 stays 0 (a free port each time); a fixed port is offset by the pipeline stage."""
    return 0 if port == 0 else port + pp_rank
