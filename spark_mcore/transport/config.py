"""Configuration of the trainer's rollout stream endpoint and of the workers that connect to it."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from spark_mcore.config.loader import ConfigError

_ALL_INTERFACES = {"*", "0.0.0.0", "::", "[::]"}


@dataclass
class StreamConfig:
    """The ZeroMQ stream between the trainer (ROUTER, binds) and rollout workers (DEALER, connect).

    bind: address the trainer binds, `tcp://HOST:PORT`; port 0 picks a free port (the chosen
        address is printed and written to `<checkpoint.dir>/stream_endpoint`). Loopback by
        default; a cluster interface when set; all interfaces only with `allow_all_interfaces`.
    allow_all_interfaces: permit binding `*` / `0.0.0.0` / `::` (then use CURVE keys).
    curve_secret_key / curve_public_key: trainer's CURVE key pair (Z85 text, 40 chars each;
        `python -c "import zmq; print(zmq.curve_keypair())"`); workers need the public key.
        Empty = no encryption (fine on loopback or a private network).
    credits_per_worker: prompts a worker may hold at once (assigned, generating, or unacked).
    worker_timeout_s: a worker silent this long loses its assignments to the others; the log
        names it.
    stall_timeout_s: the trainer gives up (StreamStalled naming the workers) when no result
        arrives for this long while it waits for a step.
    heartbeat_s: how often workers report in (and what they hold).
    max_message_bytes: the largest message the trainer takes (ZeroMQ refuses a larger frame and
        disconnects its sender; the endpoint drops a message whose frames add up to more).
    batch_max_results / batch_max_bytes: a worker sends results that are ready at the same time
        in one `results` message of at most this many results and (about) this many bytes; it
        never waits for more. 1 = one message per result. A message never exceeds
        max_message_bytes (a larger batch is split).
    batch_alone_bytes: a result of at least this many bytes shares a message only when no copy is
        needed to join it: its arrays lie end to end with the others' (`WorkerClient.send_results`
        converts the results that are ready together that way); otherwise it goes alone. Joining
        saves each message's fixed cost at both ends; copying pays for that only while results
        are small (tools/bench_stream.py, 8 x 8k-token groups of 0.72 MB: five per message with
        a copy lost ~0.2x of the baseline's rate, without one they gain).
    high_water_mark: ZeroMQ queue bound in messages per peer.
    max_token_id: results with token ids at or above this are rejected; `spark-mcore train` uses
        the model's vocabulary size when this is 0 or larger (0 elsewhere = no check).
    malloc_keep_mb: the trainer and rollout workers keep up to this many MiB of freed memory
        (glibc; at most 2047) so that ZeroMQ's receive buffers reuse warm pages instead of
        faulting in new ones for every message (`spark_mcore/transport/malloc.py`); 0 leaves
        glibc's defaults, as do MALLOC_*_ variables set by the user.
    """

    bind: str = "tcp://127.0.0.1:0"
    allow_all_interfaces: bool = False
    curve_secret_key: str = ""
    curve_public_key: str = ""
    credits_per_worker: int = 8
    worker_timeout_s: float = 30.0
    stall_timeout_s: float = 600.0
    heartbeat_s: float = 1.0
    max_message_bytes: int = 64 * 1024 * 1024
    high_water_mark: int = 256
    max_token_id: int = 0
    batch_max_results: int = 32
    batch_max_bytes: int = 4 * 1024 * 1024
    batch_alone_bytes: int = 512 * 1024
    malloc_keep_mb: int = 128

    def __post_init__(self) -> None:
        check_bind_address(self.bind, self.allow_all_interfaces)
        for name in ("credits_per_worker", "high_water_mark", "max_message_bytes", "batch_max_results", "batch_max_bytes",
                     "batch_alone_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transport.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.malloc_keep_mb < 2048:
            raise ConfigError(f"transport.malloc_keep_mb must be in [0, 2047] (MiB; 0 = glibc's defaults), "
                              f"got {self.malloc_keep_mb}")
        for name in ("worker_timeout_s", "stall_timeout_s", "heartbeat_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"transport.{name} must be > 0, got {getattr(self, name)}")
        if self.worker_timeout_s < 2 * self.heartbeat_s:
            raise ConfigError(f"transport.worker_timeout_s ({self.worker_timeout_s}) must be >= 2 x transport.heartbeat_s "
                              f"({self.heartbeat_s}) or live workers look dead")
        if self.batch_max_results > 256:
            raise ConfigError(f"transport.batch_max_results: at most 256 results per message, got {self.batch_max_results}")
        if bool(self.curve_secret_key) != bool(self.curve_public_key):
            raise ConfigError("transport.curve_secret_key and transport.curve_public_key go together: set both or neither")
        for name in ("curve_secret_key", "curve_public_key"):
            key = getattr(self, name)
            if key and len(key) != 40:
                raise ConfigError(f"transport.{name}: a Z85 CURVE key has 40 characters, got {len(key)}")


def check_bind_address(bind: str, allow_all_interfaces: bool = False) -> None:
    """Fails for anything but an explicit `tcp://HOST:PORT` (or ipc://), and for all-interface
    binds unless they were asked for explicitly."""
    if not isinstance(bind, str) or "://" not in bind:
        raise ConfigError(f"transport.bind: expected 'tcp://HOST:PORT', got {bind!r}")
    if bind.startswith("ipc://") or bind.startswith("inproc://"):
        return
    if not bind.startswith("tcp://"):
        raise ConfigError(f"transport.bind: only tcp://, ipc:// and inproc:// are supported, got {bind!r}")
    parts = urlsplit(bind)
    host = bind[len("tcp://"):].rsplit(":", 1)[0]
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"transport.bind: bad port in {bind!r} ({e})") from e
    if port is None or not host:
        raise ConfigError(f"transport.bind: expected 'tcp://HOST:PORT' with an explicit host and port, got {bind!r}")
    if host in _ALL_INTERFACES and not allow_all_interfaces:
        raise ConfigError(f"transport.bind={bind} listens on every network interface. Fix: bind the cluster "
                          "interface's address (e.g. tcp://10.0.0.5:5555), or set transport.allow_all_interfaces=true "
                          "(and CURVE keys) if that is really wanted")


__all__ = ["StreamConfig", "check_bind_address"]
