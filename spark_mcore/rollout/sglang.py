"""SGLang rollout engine: launch or attach to servers, and talk to their native HTTP API.

Pieces, each usable alone:
  SGLangConfig       what to launch/attach, timeouts, retries (the lead wires it into RunConfig)
  launch_servers     `python -m sglang.launch_server ...` per server (command configurable), tracked
                     PIDs in their own process groups, one log file each; ServerHandle.wait_healthy
  SGLangClient       /generate across servers with retries + failover, and the control endpoints
  SGLangEngine       the RolloutEngine protocol on top (built by rollout.builders for "sglang")
HTTP uses the standard library only (http.client); bodies come from `sglang_payloads`.

Failover invariant: the samples of a generate() call are split into chunks; a chunk's results
are stored only when its whole response has been parsed, and a chunk that fails on a server
after retries goes back to the queue for the remaining servers. So a dead server costs the
chunks it had in flight, never a completed sample; generate() fails only when every server is dead.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from spark_mcore.config.loader import ConfigError
from spark_mcore.errors import UserError
from spark_mcore.rollout import sglang_payloads as P
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion

logger = logging.getLogger(__name__)

DEFAULT_LAUNCH_COMMAND = ["{python}", "-m", "sglang.launch_server", "--model-path", "{model_path}",
                          "--host", "{host}", "--port", "{port}", "--base-gpu-id", "{base_gpu_id}"]


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
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"sglang: {message}")


class SGLangError(RuntimeError):
    """An SGLang server failed in a way retries cannot fix; the text says which and why."""


class SGLangRequestError(SGLangError):
    """The server rejected a request (HTTP 4xx or success=false): our payload or state is wrong."""


class EngineStartError(SGLangError, UserError):
    """A launched server exited or never became healthy: its log names the cause."""

    label = "rollout engine error"


class TransientHTTPError(SGLangError):
    """Connection refused/reset, timeout, or HTTP 408/429/5xx: worth retrying."""


# --- HTTP -----------------------------------------------------------------------------------------


def http_json(base_url: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 60.0,
              method: str | None = None) -> Any:
    """One request; returns parsed JSON (or text, or None for an empty body)."""
    u = urllib.parse.urlsplit(base_url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname or "127.0.0.1", u.port, timeout=timeout_s)
    data = None if body is None else json.dumps(body).encode()
    where = f"{base_url.rstrip('/')}{path}"
    try:
        conn.request(method or ("GET" if body is None else "POST"), u.path.rstrip("/") + path, body=data,
                     headers={"Content-Type": "application/json"} if data is not None else {})
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise TransientHTTPError(f"{where}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()
    text = raw.decode(errors="replace")
    if resp.status in (408, 429) or resp.status >= 500:
        raise TransientHTTPError(f"{where}: HTTP {resp.status}: {text[:300]}")
    if resp.status >= 400:
        raise SGLangRequestError(f"{where}: HTTP {resp.status}: {text[:1000]}")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return text


def with_retries(fn: Callable[[], Any], retries: int, backoff_s: float, max_backoff_s: float,
                 give_up: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call fn; on TransientHTTPError or an aborted request retry up to `retries` times with
    delays backoff_s, 2*backoff_s, ... (capped). `give_up()` true stops early (dead process)."""
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except (TransientHTTPError, P.SGLangAbortedError) as e:
            if attempt == retries or give_up():
                raise
            logger.warning("sglang: transient error (attempt %d/%d), retrying in %.2fs: %s", attempt + 1,
                           retries + 1, delay, e)
            sleep(delay)
            delay = min(delay * 2, max_backoff_s)
    raise AssertionError("unreachable")


# --- server lifecycle -----------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A server we launched (process + log file) or attached to (url only)."""

    url: str
    index: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log: attached server)" if self.process is None else "(log file missing)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])

    def describe(self) -> str:
        pid = f" pid {self.process.pid}" if self.process is not None else ""
        return f"sglang server {self.index} at {self.url}{pid}"

    def wait_healthy(self, timeout_s: float, health_path: str = "/health_generate", poll_s: float = 0.5) -> None:
        """Block until GET health_path answers 200; raises SGLangError with the log tail on
        timeout or if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise EngineStartError(f"{self.describe()} exited with code {self.process.returncode} before becoming "
                                  f"healthy; log {self.log_path} ends with:\n{self.log_tail()}")
            try:
                http_json(self.url, health_path, timeout_s=max(1.0, min(poll_s * 4, 30.0)))
                return
            except SGLangError:
                pass
            if time.monotonic() > deadline:
                raise EngineStartError(f"{self.describe()} not healthy after {timeout_s:.0f}s (GET {health_path}); "
                                  f"log {self.log_path} ends with:\n{self.log_tail()}")
            time.sleep(poll_s)

    def terminate(self, timeout_s: float = 30.0) -> None:
        """Stop a launched server and the children in its process group (no-op when attached)."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)  # its own group: start_new_session=True at launch
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_servers(n: int, model_path: str, base_port: int, extra_args: Sequence[str], log_dir: str | Path,
                   command: Sequence[str] | None = None, host: str = "127.0.0.1", port_stride: int = 10,
                   gpus_per_server: int = 1, env: dict[str, str] | None = None) -> list[ServerHandle]:
    """Start n servers (not waiting for them); base_port 0 picks free ports. Each runs in its own
    process group and writes stdout+stderr to <log_dir>/sglang_server_<i>.log."""
    log_root = Path(log_dir)
    log_root.mkdir(parents=True, exist_ok=True)
    template = list(command or DEFAULT_LAUNCH_COMMAND)
    handles: list[ServerHandle] = []
    try:
        for i in range(n):
            port = free_port(host) if base_port == 0 else base_port + i * port_stride
            values = {"python": sys.executable, "model_path": model_path, "host": host, "port": port, "index": i,
                      "base_gpu_id": i * gpus_per_server}
            try:
                argv = [part.format(**values) for part in template] + list(extra_args)
            except (KeyError, IndexError) as e:
                raise ConfigError(f"sglang.launch_command: unknown placeholder {e}; use {sorted(values)}") from e
            log_path = log_root / f"sglang_server_{i}.log"
            with open(log_path, "wb") as log:
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})}, start_new_session=True)
            handles.append(ServerHandle(url=f"http://{host}:{port}", index=i, process=proc, log_path=log_path))
            logger.info("launched %s, log %s", handles[-1].describe(), log_path)
    except BaseException:
        for h in handles:
            h.terminate(timeout_s=5)
        raise
    return handles


def attach_servers(urls: Sequence[str]) -> list[ServerHandle]:
    return [ServerHandle(url=u.rstrip("/"), index=i) for i, u in enumerate(urls)]


def weight_group_layout(num_servers: int, gpus_per_server: int) -> tuple[int, list[int]]:
    """(world_size, rank_offset per server) of the weight-update group; the trainer is rank 0."""
    return 1 + num_servers * gpus_per_server, [1 + i * gpus_per_server for i in range(num_servers)]


# --- client ---------------------------------------------------------------------------------------


class PendingCalls:
    """Control calls running on every server in background threads (see `wait`)."""

    def __init__(self, futures: list[tuple[ServerHandle, Future]]) -> None:
        self._futures = futures

    def wait(self, timeout_s: float | None = None) -> list[Any]:
        """Results per server; raises SGLangError naming the server (with its log tail) on failure."""
        out = []
        for handle, fut in self._futures:
            try:
                out.append(fut.result(timeout=timeout_s))
            except SGLangError as e:
                raise type(e)(f"{handle.describe()}: {e}\nlog tail:\n{handle.log_tail()}") from e
        return out


class SGLangClient:
    """Talks to a set of servers: generate with failover, control calls on all live servers."""

    def __init__(self, handles: Sequence[ServerHandle], config: SGLangConfig,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not handles:
            raise SGLangError("SGLangClient needs at least one server handle")
        self.handles = list(handles)
        self.config = config
        self.dead: dict[int, str] = {}  # index -> reason with log tail
        self._sleep = sleep
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(self.handles)), thread_name_prefix="sglang-ctl")

    def live(self) -> list[ServerHandle]:
        for h in self.handles:
            if h.index not in self.dead and not h.alive():
                self._mark_dead(h, SGLangError(f"process exited with code {h.process.returncode}"))
        return [h for h in self.handles if h.index not in self.dead]

    def _mark_dead(self, handle: ServerHandle, error: BaseException) -> None:
        if handle.index not in self.dead:
            self.dead[handle.index] = f"{handle.describe()}: {error}\nlog tail:\n{handle.log_tail()}"
            logger.error("sglang: %s is considered dead and left out; its pending requests go to the "
                         "remaining servers. %s", handle.describe(), self.dead[handle.index])

    def _retry(self, handle: ServerHandle, fn: Callable[[], Any]) -> Any:
        c = self.config
        return with_retries(fn, c.max_retries, c.backoff_s, c.max_backoff_s, sleep=self._sleep,
                            give_up=lambda: not handle.alive() or handle.index in self.dead)

    # generate ---------------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[list[int]], params: SamplingParams,
                 image_data: Sequence[list[str]] | None = None) -> list[list[Completion]]:
        """For each prompt, params.n completions in sample order (see sglang_payloads)."""
        requests = P.expand_requests(prompt_ids, params.n, image_data)
        P.build_sampling_params(params)  # validate here, in the caller's thread
        if not requests:
            return []
        size = self.config.chunk_size
        chunks = [requests[k:k + size] for k in range(0, len(requests), size)]
        results = self._run_chunks(chunks, params)
        out: list[list[Completion]] = [[] for _ in prompt_ids]
        for chunk, comps in zip(chunks, results, strict=True):
            for req, comp in zip(chunk, comps, strict=True):
                out[req.prompt_index].append(comp)
        return out

    def _targets(self) -> list[ServerHandle]:
        if self.config.router_url:
            return [ServerHandle(url=self.config.router_url.rstrip("/"), index=-1)]
        live = self.live()
        if not live:
            raise SGLangError("no live SGLang server left:\n" + "\n".join(self.dead.values()))
        return live

    def _run_chunks(self, chunks: list[list[P.SampleRequest]], params: SamplingParams) -> list[list[Completion]]:
        state = _ChunkQueue(len(chunks))
        workers = [threading.Thread(target=self._worker, args=(h, chunks, params, state), daemon=True,
                                    name=f"sglang-gen-{h.index}")
                   for h in self._targets() for _ in range(self.config.concurrency_per_server)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if state.fatal is not None:
            raise state.fatal
        if state.done < len(chunks):
            raise SGLangError(f"{len(chunks) - state.done} of {len(chunks)} generate chunks could not be served: "
                              "every SGLang server is dead:\n" + "\n".join(self.dead.values()))
        return [state.results[i] for i in range(len(chunks))]

    def _worker(self, handle: ServerHandle, chunks: list[list[P.SampleRequest]], params: SamplingParams,
                state: _ChunkQueue) -> None:
        while handle.index not in self.dead and (idx := state.take()) is not None:
            try:
                state.complete(idx, self._serve_chunk(handle, chunks[idx], params))
            except (TransientHTTPError, P.SGLangAbortedError) as e:
                if handle.index >= 0:
                    self._mark_dead(handle, e)
                state.give_back(idx, last_worker_standing=handle.index < 0)
                return
            except (SGLangError, P.SGLangResponseError) as e:
                state.fail(SGLangRequestError(f"{handle.describe()} rejected /generate: {e}"))
                return
            except Exception as e:  # a bug must not leave the other workers waiting on this chunk
                state.fail(e)
                return

    def _serve_chunk(self, handle: ServerHandle, chunk: list[P.SampleRequest], params: SamplingParams
                     ) -> list[Completion]:
        body = P.build_generate_payload(chunk, params)
        return self._retry(handle, lambda: P.parse_generate_response(
            http_json(handle.url, "/generate", body, self.config.request_timeout_s), len(chunk)))

    # control ----------------------------------------------------------------------------------

    def _call_all(self, path: str, body_for: Callable[[int, ServerHandle], dict[str, Any] | None],
                  method: str = "POST") -> PendingCalls:
        live = self.live()
        if not live:
            raise SGLangError(f"{path}: no live SGLang server:\n" + "\n".join(self.dead.values()))

        def one(k: int, h: ServerHandle) -> Any:
            res = self._retry(h, lambda: http_json(h.url, path, body_for(k, h), self.config.control_timeout_s, method))
            if isinstance(res, dict) and res.get("success") is False:
                raise SGLangRequestError(f"{path} failed: {res.get('message')}")
            return res
        return PendingCalls([(h, self._pool.submit(one, k, h)) for k, h in enumerate(live)])

    def health(self) -> dict[str, bool]:
        out = {}
        for h in self.handles:
            try:
                http_json(h.url, self.config.health_path, timeout_s=30)
                out[h.url] = h.alive()
            except SGLangError:
                out[h.url] = False
        return out

    def pause_generation(self, mode: P.PauseMode = "abort") -> None:
        self._call_all("/pause_generation", lambda k, h: P.build_pause_generation_payload(mode)).wait()

    def continue_generation(self) -> None:
        self._call_all("/continue_generation", lambda k, h: P.build_continue_generation_payload()).wait()

    def flush_cache(self) -> None:
        self._call_all("/flush_cache", lambda k, h: None, method="POST").wait()

    def init_weights_update_group(self, master_address: str, master_port: int,
                                  group_name: str = P.DEFAULT_GROUP_NAME, backend: str = "nccl") -> PendingCalls:
        """Asks every server to join the weight-update group and returns at once: the trainer
        must join as rank 0 (world size from `weight_group_layout`) before `.wait()` can finish."""
        self.live()  # marks exited processes dead
        if self.dead:  # every rank of the group must join, or NCCL init hangs
            raise SGLangError("cannot form the weight-update group with dead servers; restart them first:\n"
                              + "\n".join(self.dead.values()))
        world, offsets = weight_group_layout(len(self.handles), self.config.gpus_per_server)
        return self._call_all("/init_weights_update_group", lambda k, h: P.build_init_weights_update_group_payload(
            master_address, master_port, offsets[h.index], world, group_name, backend))

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = P.DEFAULT_GROUP_NAME, weight_version: str | None = None,
                                        flush_cache: bool = True) -> PendingCalls:
        """Announces one bucket; returns at once so the trainer can broadcast the tensors (same order)."""
        body = P.build_update_weights_from_distributed_payload(names, dtypes, shapes, group_name, weight_version,
                                                               flush_cache)
        return self._call_all("/update_weights_from_distributed", lambda k, h: body)

    def update_weights_from_tensor(self, serialized_per_server: Sequence[Sequence[bytes]],
                                   weight_version: str | None = None, flush_cache: bool = True) -> None:
        """Colocated path: blob list k (one blob per TP rank) goes to live server k."""
        live = self.live()
        if len(serialized_per_server) != len(live):
            raise ValueError(f"serialized_per_server: {len(serialized_per_server)} entries for {len(live)} live servers")
        bodies = [P.build_update_weights_from_tensor_payload(b, weight_version, flush_cache) for b in serialized_per_server]
        self._call_all("/update_weights_from_tensor", lambda k, h: bodies[k]).wait()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _ChunkQueue:
    """Shared work queue of chunk indices for the generate workers."""

    def __init__(self, n: int) -> None:
        self.pending = collections.deque(range(n))
        self.results: dict[int, list[Completion]] = {}
        self.done = 0
        self.total = n
        self.in_flight = 0
        self.fatal: BaseException | None = None
        self._cond = threading.Condition()

    def take(self) -> int | None:
        with self._cond:
            while not self.pending and self.done < self.total and self.fatal is None and self.in_flight:
                self._cond.wait(0.1)  # another worker may give its chunk back
            if not self.pending or self.fatal is not None:
                return None
            self.in_flight += 1
            return self.pending.popleft()

    def complete(self, idx: int, comps: list[Completion]) -> None:
        with self._cond:
            self.results[idx] = comps
            self.done += 1
            self.in_flight -= 1
            self._cond.notify_all()

    def give_back(self, idx: int, last_worker_standing: bool = False) -> None:
        with self._cond:
            if last_worker_standing:  # the router is the only target: nobody else can take it
                self.in_flight -= 1
                self.fatal = SGLangError(f"/generate through the router failed after retries (chunk {idx})")
            else:
                self.pending.appendleft(idx)
                self.in_flight -= 1
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.fatal = error
            self.in_flight -= 1
            self._cond.notify_all()


# --- engine ---------------------------------------------------------------------------------------


class WeightSync(Protocol):
    """Moves HF-named full tensors into the servers (e.g. NCCL broadcast, spark_mcore.weights)."""

    def __call__(self, client: SGLangClient, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        ...


class SGLangEngine:
    """RolloutEngine over SGLang servers. Launches them unless `config.urls` names running ones."""

    def __init__(self, config: SGLangConfig, weight_sync: WeightSync | None = None,
                 handles: Sequence[ServerHandle] | None = None) -> None:
        self.config = config
        self.weight_sync = weight_sync
        self.policy_version = 0
        self._owned: list[ServerHandle] = []
        if handles is None:
            if not config.urls and not config.model_path:
                raise ConfigError("sglang.model_path: required to launch servers (or set sglang.urls to attach)")
            if config.urls:
                handles = attach_servers(config.urls)
            else:
                handles = self._owned = launch_servers(
                    config.num_servers, config.model_path, config.base_port, config.extra_args, config.log_dir,
                    config.launch_command, config.host, config.port_stride, config.gpus_per_server)
            try:
                for h in handles:
                    h.wait_healthy(config.startup_timeout_s, config.health_path)
            except BaseException:
                self.shutdown()
                raise
        self.client = SGLangClient(handles, config)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams,
                 image_data: Sequence[list[str]] | None = None) -> list[list[Completion]]:
        """`image_data[i]`: image paths/URLs of prompt i for vision-language models."""
        return self.client.generate(prompt_ids, params, image_data)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.weight_sync is None:
            raise SGLangError("SGLangEngine.update_weights needs a weight_sync (e.g. the NCCL broadcaster from "
                              "spark_mcore.weights); pass weight_sync= when building the 'sglang' engine")
        self.client.pause_generation()
        try:
            self.weight_sync(self.client, named_tensors, version)
        finally:
            self.client.continue_generation()
        self.policy_version = version

    def shutdown(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        for h in self._owned:
            h.terminate()


__all__ = [
    "SGLangConfig", "SGLangError", "SGLangRequestError", "TransientHTTPError", "ServerHandle", "launch_servers",
    "attach_servers", "weight_group_layout", "free_port", "http_json", "with_retries", "PendingCalls",
    "SGLangClient", "WeightSync", "SGLangEngine",
]
