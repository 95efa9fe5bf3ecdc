"""SGLangConfig: which SGLang servers to launch or attach to (imports neither torch nor HTTP code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from spark_mcore.config.loader import ConfigError

DEFAULT_LAUNCH_COMMAND = ["{python}", "-m", "sglang.launch_server", "--model-path", "{model_path}",
                          "--host", "{host}", "--port", "{port}", "--base-gpu-id", "{base_gpu_id}"]


DETERMINISTIC_FLAG = "--enable-deterministic-inference"


@dataclass
class SGLangConfig:
    """SGLang servers for rollouts.

    urls: attach to these running servers (e.g. ["http://10.0.0.5:30000"]); empty = launch.
    num_servers / model_path / launch_command / extra_args: what to launch. `launch_command`
        placeholders: {python} {model_path} {host} {port} {index} {base_gpu_id}.
    base_port: port of server 0 (server i uses base_port + i * port_stride); 0 = free ports.
    gpus_per_server: GPUs each server uses (tp x dp); sets {base_gpu_id} and weight-group ranks.
    router_url: send /generate to an sgl-router instead (control calls still go to each server).
    chunk_size: samples per /generate request; concurrency_per_server: requests in flight each.
    max_retries / backoff_s / max_backoff_s: per-request retries of transient errors (connection
        refused/reset, timeouts, HTTP 408/429/5xx, aborted requests), exponential backoff.
    python: interpreter of the SGLang environment for {python} (SGLang pins its own torch, so
        on GPU clusters it lives in another venv or image, e.g. /opt/sglang/bin/python); "" =
        this interpreter.
    first_gpu: local GPU of launched server 0; -1 = right after the trainer's GPUs on this
        node (LOCAL_WORLD_SIZE under torchrun). Server i then sees only GPUs
        first_gpu + i * gpus_per_server ... (CUDA_VISIBLE_DEVICES), never a trainer rank's.
    deterministic: launch with --enable-deterministic-inference. SGLang ignores per-request
        sampling seeds without it (rollouts are then not reproducible); it costs throughput.
    flush_timeout_s: /flush_cache waits up to this long for running requests to finish (SGLang
        answers 400 while requests are still running, e.g. right after a pause).
    check_server_info: after startup, compare each server's tp_size x pp_size (GET
        /get_server_info) with gpus_per_server and note servers that ignore seeds.
    """

    urls: list[str] = field(default_factory=list)
    num_servers: int = 1
    model_path: str = ""
    launch_command: list[str] = field(default_factory=lambda: list(DEFAULT_LAUNCH_COMMAND))
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    base_port: int = 30000
    port_stride: int = 10
    gpus_per_server: int = 1
    log_dir: str = "logs/sglang"
    router_url: str | None = None
    health_path: str = "/health_generate"
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    control_timeout_s: float = 300.0
    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 16.0
    chunk_size: int = 64
    concurrency_per_server: int = 4
    python: str = ""
    first_gpu: int = -1
    deterministic: bool = False
    flush_timeout_s: float = 60.0
    check_server_info: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.urls or self.num_servers >= 1, "num_servers must be >= 1"),
            (all(u.startswith(("http://", "https://")) for u in self.urls), "urls must start with http:// or https://"),
            (self.router_url is None or self.router_url.startswith(("http://", "https://")),
             "router_url must start with http:// or https://"),
            (0 <= self.base_port < 65536 and self.port_stride >= 1, "base_port must be in 0..65535, port_stride >= 1"),
            (self.gpus_per_server >= 1, "gpus_per_server must be >= 1"),
            (min(self.startup_timeout_s, self.request_timeout_s, self.control_timeout_s) > 0, "timeouts must be > 0"),
            (self.max_retries >= 0 and self.backoff_s >= 0 and self.max_backoff_s >= self.backoff_s,
             "max_retries >= 0 and 0 <= backoff_s <= max_backoff_s"),
            (self.chunk_size >= 1 and self.concurrency_per_server >= 1, "chunk_size and concurrency_per_server must be >= 1"),
            (self.health_path.startswith("/"), "health_path must start with '/' (e.g. /health_generate)"),
            (self.first_gpu >= -1, "first_gpu must be >= 0, or -1 for right after the trainer's GPUs"),
            (self.flush_timeout_s > 0, "flush_timeout_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"sglang: {message}")


def launch_extra_args(cfg: SGLangConfig) -> list[str]:
    """extra_args plus the flags other fields imply (deterministic inference)."""
    extra = list(cfg.extra_args)
    if cfg.deterministic and DETERMINISTIC_FLAG not in extra:
        extra.append(DETERMINISTIC_FLAG)
    return extra
