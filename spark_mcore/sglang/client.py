"""SGLang servers: launch or attach to them, and talk to their native HTTP API.

Pieces, each usable alone:
  SGLangConfig       what to launch/attach, timeouts, retries (spark_mcore.sglang.config)
  launch_servers     `python -m sglang.launch_server ...` per server (command configurable), tracked
                     PIDs in their own process groups, one log file each; ServerHandle.wait_healthy
  SGLangClient       /generate across servers with retries + failover, and the control endpoints
The rollout engine (spark_mcore.rollout.sglang_engine) and the weight sync (spark_mcore.weights)
both build on this client; neither imports the other.
HTTP uses the standard library only (http.client); bodies come from `payloads.py`.

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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_mcore.config.loader import ConfigError
from spark_mcore.errors import UserError
from spark_mcore.sglang import payloads as P
from spark_mcore.sglang import placement
from spark_mcore.sglang.config import DEFAULT_LAUNCH_COMMAND, SGLangConfig
from spark_mcore.types import Completion, SamplingParams

logger = logging.getLogger(__name__)

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


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_servers(n: int, model_path: str, base_port: int, extra_args: Sequence[str], log_dir: str | Path,
                   command: Sequence[str] | None = None, host: str = "127.0.0.1", port_stride: int = 10,
                   gpus_per_server: int = 1, env: dict[str, str] | None = None, python: str | None = None,
                   first_gpu: int | None = None, gpu_count: int | None = None) -> list[ServerHandle]:
    """Start n servers (not waiting for them); base_port 0 picks free ports. Each runs in its own
    process group and writes stdout+stderr to <log_dir>/sglang_server_<i>.log.

    python: interpreter for {python} (the rollout environment; default this one). With GPUs
    (gpu_count, default this node's), server i sees only its own GPUs, placed after the trainer's
    (first_gpu, default the trainer's local GPU count; `spark_mcore.sglang.placement`), and
    starts with {base_gpu_id} 0. Every server gets this environment without torchrun's
    rendezvous variables, plus `env`."""
    log_root = Path(log_dir)
    log_root.mkdir(parents=True, exist_ok=True)
    template = list(command or DEFAULT_LAUNCH_COMMAND)
    gpus = _gpu_count() if gpu_count is None else gpu_count
    start = placement.trainer_local_gpus(cuda=gpus > 0) if first_gpu is None or first_gpu < 0 else first_gpu
    gpu_ids = placement.server_gpu_ids(n, gpus_per_server, start, gpus) if gpus else None
    handles: list[ServerHandle] = []
    try:
        for i in range(n):
            port = free_port(host) if base_port == 0 else base_port + i * port_stride
            values = {"python": python or sys.executable, "model_path": model_path, "host": host, "port": port,
                      "index": i, "base_gpu_id": 0 if gpu_ids else i * gpus_per_server}
            extra_env = dict(env or {})
            if gpu_ids:
                extra_env["CUDA_VISIBLE_DEVICES"] = placement.visible_devices(gpu_ids[i])
            try:
                argv = [part.format(**values) for part in template] + list(extra_args)
            except (KeyError, IndexError) as e:
                raise ConfigError(f"sglang.launch_command: unknown placeholder {e}; use {sorted(values)}") from e
            log_path = log_root / f"sglang_server_{i}.log"
            with open(log_path, "wb") as log:
                log.write(f"$ {' '.join(argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=placement.scrubbed_env(extra=extra_env), start_new_session=True)
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
        """For each prompt, params.n completions in sample order (see payloads.py)."""
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

    def flush_cache(self, timeout_s: float | None = None) -> None:
        """/flush_cache on every server; SGLang waits up to timeout_s (default
        sglang.flush_timeout_s) for running requests instead of answering 400 at once."""
        body = P.build_flush_cache_payload(self.config.flush_timeout_s if timeout_s is None else timeout_s)
        self._call_all("/flush_cache", lambda k, h: body, method="POST").wait()

    def server_info(self) -> list[tuple[str, dict[str, Any]]]:
        """(url, GET /get_server_info) of every live server."""
        answers = self._call_all("/get_server_info", lambda k, h: None, method="GET").wait()
        return [(h.url, a if isinstance(a, dict) else {}) for h, a in zip(self.live(), answers, strict=True)]

    def destroy_weights_update_group(self, group_name: str = P.DEFAULT_GROUP_NAME) -> list[str]:
        """Asks every live server to drop `group_name`; returns the servers that had none (their
        refusal is expected after a fresh start, so it is not an error)."""
        body = P.build_destroy_weights_update_group_payload(group_name)
        missing = []
        for h in self.live():
            try:
                res = http_json(h.url, "/destroy_weights_update_group", body, self.config.control_timeout_s)
            except SGLangRequestError:
                missing.append(h.url)
                continue
            if isinstance(res, dict) and res.get("success") is False:
                missing.append(h.url)
        return missing

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


__all__ = [
    "SGLangConfig", "SGLangError", "SGLangRequestError", "TransientHTTPError", "ServerHandle", "launch_servers",
    "attach_servers", "weight_group_layout", "free_port", "http_json", "with_retries", "PendingCalls",
    "SGLangClient",
]
