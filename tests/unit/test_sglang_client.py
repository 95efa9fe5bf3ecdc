"""SGLangClient / SGLangEngine against fake SGLang HTTP servers running in threads.

The fake answers /generate deterministically (output ids from the prompt and the seed) and
checks every body it receives against SGLang's request classes (the contract checker of
test_sglang_payloads.py), so these tests also prove the bodies actually sent are valid.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spark_mcore.config.loader import ConfigError, from_dict
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.sglang_engine import SGLangEngine
from spark_mcore.sglang.client import (
    SGLangClient,
    SGLangConfig,
    SGLangError,
    SGLangRequestError,
    attach_servers,
    weight_group_layout,
)

_spec = importlib.util.spec_from_file_location("sglang_contract", Path(__file__).with_name("test_sglang_payloads.py"))
contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract)  # type: ignore[union-attr]

CONTROL_CLASSES = {"/pause_generation": "PauseGenerationReqInput", "/continue_generation": "ContinueGenerationReqInput",
                   "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
                   "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
                   "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput"}


def expected_ids(prompt: list[int], seed: int = 0) -> list[int]:
    return [sum(prompt) % 50 + 10 + seed, 2]


class FakeSGLang(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.calls: list[tuple[str, Any]] = []
        self.served_chunks = 0
        self.fail_next = 0        # answer this many /generate with HTTP 503
        self.abort_next = 0       # answer this many /generate with finish_reason abort
        self.reject = False       # answer /generate with HTTP 400
        self.die_after: int | None = None  # after this many served chunks, drop connections and stop
        self.control_success = True
        self.dead = False
        self.contract_errors: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def die(self) -> None:
        self.dead = True
        threading.Thread(target=lambda: (self.shutdown(), self.server_close()), daemon=True).start()

    def generate(self, body: dict[str, Any]) -> tuple[int, Any]:
        self.contract_errors += contract.check_object(body, "GenerateReqInput")
        self.contract_errors += contract.check_object(body, "api.v1.GenerateRequest")
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                return 503, {"error": "overloaded"}
            if self.reject:
                return 400, {"error": "bad field"}
            abort = self.abort_next > 0
            self.abort_next -= int(abort)
        sps = body["sampling_params"]
        out = []
        for k, ids in enumerate(body["input_ids"]):
            sp = sps[k] if isinstance(sps, list) else sps
            toks = expected_ids(ids, sp.get("sampling_seed", 0))[: sp["max_new_tokens"]]
            finish = {"type": "abort", "message": "paused"} if abort else (
                {"type": "stop", "matched": 2} if toks[-1] in sp.get("stop_token_ids", []) else {"type": "length"})
            out.append({"text": f"t{toks[0]}", "output_ids": toks, "meta_info": {
                "id": f"r{k}", "finish_reason": finish,
                "output_token_logprobs": [[-0.25 * (j + 1), t, None] for j, t in enumerate(toks)]}})
        with self.lock:
            self.served_chunks += int(not abort)
        return 200, out


class _Handler(BaseHTTPRequestHandler):
    server: FakeSGLang

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if not self.server.dead:
            self._reply(200, {})

    def do_POST(self) -> None:
        srv = self.server
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        if srv.dead or (srv.die_after is not None and srv.served_chunks >= srv.die_after and self.path == "/generate"):
            if not srv.dead:
                srv.die()
            self.close_connection = True
            return  # no answer: the client sees the connection drop
        with srv.lock:
            srv.calls.append((self.path, body))
        if self.path == "/generate":
            time.sleep(0.01)  # let the other server's worker interleave
            self._reply(*srv.generate(body))
        elif self.path == "/flush_cache":
            self._reply(200, "Cache flushed.")
        else:
            if self.path in CONTROL_CLASSES:
                srv.contract_errors += contract.check_object(body, CONTROL_CLASSES[self.path])
            self._reply(200 if srv.control_success else 400, {"success": srv.control_success, "message": "m"})


@pytest.fixture
def servers() -> Iterator[list[FakeSGLang]]:
    made = [FakeSGLang(), FakeSGLang()]
    yield made
    for s in made:
        if not s.dead:
            s.shutdown()
            s.server_close()
    for s in made:
        assert not s.contract_errors, s.contract_errors


def _client(servers: list[FakeSGLang], **kw: Any) -> SGLangClient:
    cfg = SGLangConfig(**{"urls": [s.url for s in servers], "chunk_size": 2, "concurrency_per_server": 1,
                          "max_retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, **kw})
    return SGLangClient(attach_servers(cfg.urls), cfg)


PROMPTS = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]


def _check_results(out: list[list[Any]], n: int, seed: int | None = None) -> None:
    assert len(out) == len(PROMPTS)
    for i, (prompt, comps) in enumerate(zip(PROMPTS, out, strict=True)):
        assert len(comps) == n
        for j, c in enumerate(comps):
            s = 0 if seed is None else seed + i * n + j
            assert c.token_ids == expected_ids(prompt, s) and c.logprobs == [-0.25, -0.5]
            assert c.text == f"t{c.token_ids[0]}"


def test_generate_chunks_across_servers_and_keeps_order(servers: list[FakeSGLang]) -> None:
    client = _client(servers)
    out = client.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=2, stop_token_ids=[2], seed=100))
    _check_results(out, 2, seed=100)
    assert out[0][0].finish_reason == "stop"
    bodies = [b for s in servers for p, b in s.calls if p == "/generate"]
    assert sorted(len(b["input_ids"]) for b in bodies) == [2, 2, 2, 2, 2]  # 10 samples in chunks of 2
    assert all(s.served_chunks >= 1 for s in servers)  # both servers took work
    single = _client(servers[:1], chunk_size=3).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=2, seed=100))
    assert [[c.token_ids for c in cs] for cs in single] == [[c.token_ids for c in cs] for cs in out]
    client.close()


def test_transient_errors_are_retried_with_exponential_backoff(servers: list[FakeSGLang]) -> None:
    sleeps: list[float] = []
    cfg = SGLangConfig(urls=[servers[0].url], chunk_size=10, max_retries=3, backoff_s=0.1, max_backoff_s=0.15)
    client = SGLangClient(attach_servers(cfg.urls), cfg, sleep=sleeps.append)
    servers[0].fail_next = 2
    servers[0].abort_next = 1
    _check_results(client.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2)), 1)
    assert sleeps == [0.1, 0.15, 0.15]  # 503, 503, abort, then success; delay doubles up to the cap
    assert servers[0].served_chunks == 1 and not client.dead


def test_dead_server_fails_over_without_losing_completed_samples(servers: list[FakeSGLang]) -> None:
    servers[0].die_after = 1  # serves one chunk, then drops connections and stops listening
    client = _client(servers)
    out = client.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=2))
    _check_results(out, 2)
    assert servers[0].served_chunks == 1 and servers[1].served_chunks == 4  # nothing served twice
    assert list(client.dead) == [0] and "log tail" in client.dead[0] and servers[0].url in client.dead[0]
    assert [h.index for h in client.live()] == [1]
    _check_results(client.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=2)), 2)  # keeps working


def test_all_servers_dead_raises_with_each_server_named(servers: list[FakeSGLang]) -> None:
    for s in servers:
        s.die_after = 0
    client = _client(servers)
    with pytest.raises(SGLangError, match="every SGLang server is dead") as e:
        client.generate(PROMPTS, SamplingParams(n=1))
    assert servers[0].url in str(e.value) and servers[1].url in str(e.value)
    with pytest.raises(SGLangError, match="no live SGLang server"):
        client.generate(PROMPTS, SamplingParams(n=1))


def test_rejected_request_is_not_retried(servers: list[FakeSGLang]) -> None:
    servers[0].reject = True
    client = _client(servers[:1])
    with pytest.raises(SGLangRequestError, match=r"rejected /generate: .*HTTP 400: \{\"error\": \"bad field\"\}"):
        client.generate(PROMPTS, SamplingParams(n=1))
    assert [p for p, _ in servers[0].calls] == ["/generate"] and not client.dead


def test_control_calls_reach_every_server_with_rank_offsets(servers: list[FakeSGLang]) -> None:
    client = _client(servers, gpus_per_server=2)
    assert weight_group_layout(2, 2) == (5, [1, 3])
    client.pause_generation("retract")
    pending = client.init_weights_update_group("10.1.1.1", 29555)
    assert pending.wait(timeout_s=5) == [{"success": True, "message": "m"}] * 2
    client.update_weights_from_distributed(["w"], ["bfloat16"], [[2, 2]], weight_version="3").wait(5)
    client.update_weights_from_tensor([[b"a"], [b"b"]])
    client.flush_cache()
    client.continue_generation()
    for k, s in enumerate(servers):
        calls = dict(s.calls)
        assert [p for p, _ in s.calls] == ["/pause_generation", "/init_weights_update_group",
                                           "/update_weights_from_distributed", "/update_weights_from_tensor",
                                           "/flush_cache", "/continue_generation"]
        assert calls["/pause_generation"] == {"mode": "retract"}
        assert calls["/init_weights_update_group"]["rank_offset"] == [1, 3][k]
        assert calls["/init_weights_update_group"]["world_size"] == 5
        assert calls["/update_weights_from_tensor"]["serialized_named_tensors"] == [["YQ=="], ["Yg=="]][k]
    servers[1].control_success = False
    with pytest.raises(SGLangRequestError, match=rf"sglang server 1 at {servers[1].url}: .*HTTP 400"):
        client.continue_generation()
    client.dead[1] = "server 1: gone"
    with pytest.raises(SGLangError, match="cannot form the weight-update group with dead servers"):
        client.init_weights_update_group("10.1.1.1", 29555)


def test_engine_generates_through_attached_servers_and_keeps_them(servers: list[FakeSGLang]) -> None:
    engine = SGLangEngine(SGLangConfig(urls=[servers[0].url]))
    assert engine.policy_version == 0
    assert engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2))[0][0].token_ids == [13, 2]
    engine.shutdown()  # attached servers are not ours: they keep serving
    client = SGLangClient(attach_servers([servers[0].url]), SGLangConfig())
    assert client.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2))[0][0].token_ids == [13, 2]
    client.close()


def test_config_validation_names_the_field() -> None:
    assert SGLangConfig().num_servers == 1  # the default must construct (the run config embeds it)
    cfg = from_dict(SGLangConfig, {"urls": ["http://h:1"], "router_url": None, "max_retries": 0})
    assert cfg.urls == ["http://h:1"] and cfg.max_retries == 0
    with pytest.raises(ConfigError, match="sglang: urls must start with http"):
        SGLangConfig(urls=["h:1"])
    with pytest.raises(ConfigError, match="sglang: chunk_size"):
        SGLangConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="sglang.model_path: required to launch"):
        SGLangEngine(SGLangConfig())
