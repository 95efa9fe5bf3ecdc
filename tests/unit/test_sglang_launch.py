"""Server lifecycle with a fake `launch_server` script: launch, health, logs, early exit, timeout,
kill mid-run (failover with the log tail), and teardown of the process groups."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.sglang_engine import SGLangEngine
from spark_mcore.sglang.client import SGLangClient, SGLangConfig, SGLangError, launch_servers

FAKE_SERVER = textwrap.dedent("""
    import argparse, json, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--index", type=int)
    ap.add_argument("--mode", default="ok")
    a, _unknown = ap.parse_known_args()
    print(f"fake sglang {a.index} starting on port {a.port}", flush=True)
    if a.mode == "crash":
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    if a.mode == "hang":
        time.sleep(60)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, obj):
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply({})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            out = []
            for ids in body["input_ids"]:
                toks = [sum(ids) + 100 * a.index, 2]
                out.append({"text": "x", "output_ids": toks, "meta_info": {
                    "finish_reason": {"type": "length"},
                    "output_token_logprobs": [[-1.0, t, None] for t in toks]}})
            self.reply(out)

    HTTPServer(("127.0.0.1", a.port), H).serve_forever()
""")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    p = tmp_path / "fake_launch_server.py"
    p.write_text(FAKE_SERVER)
    return p


def _cmd(script: Path, mode: str = "ok") -> list[str]:
    return ["{python}", str(script), "--port", "{port}", "--index", "{index}", "--mode", mode]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_wait_generate_and_terminate(script: Path, tmp_path: Path) -> None:
    handles = launch_servers(2, "unused-model", 0, [], tmp_path / "logs", command=_cmd(script))
    try:
        for h in handles:
            h.wait_healthy(timeout_s=15, poll_s=0.05)
        assert len({h.url for h in handles}) == 2
        log0 = (tmp_path / "logs" / "sglang_server_0.log").read_text()
        assert log0.startswith(f"$ {sys.executable} {script} --port ") and "fake sglang 0 starting" in log0
        cfg = SGLangConfig(urls=[h.url for h in handles], chunk_size=1, concurrency_per_server=1, backoff_s=0.01)
        client = SGLangClient(handles, cfg)
        out = client.generate([[1], [2], [3], [4]], SamplingParams(n=1))
        assert [c[0].token_ids[0] % 100 for c in out] == [1, 2, 3, 4]
        # Kill server 0: its chunks go to server 1 and the dead report carries its log tail.
        handles[0].terminate(timeout_s=5)
        out = client.generate([[5], [6]], SamplingParams(n=2))
        assert [[c.token_ids[0] for c in cs] for cs in out] == [[105, 105], [106, 106]]
        assert "fake sglang 0 starting" in client.dead[0] and f"pid {handles[0].process.pid}" in client.dead[0]
        client.close()
    finally:
        for h in handles:
            h.terminate(timeout_s=5)
    assert all(_gone(h.process.pid) for h in handles)


def test_early_exit_reports_exit_code_and_log_tail(script: Path, tmp_path: Path) -> None:
    (h,) = launch_servers(1, "m", 0, [], tmp_path, command=_cmd(script, "crash"))
    with pytest.raises(SGLangError, match=r"exited with code 3 before becoming healthy") as e:
        h.wait_healthy(timeout_s=15, poll_s=0.05)
    assert "RuntimeError: CUDA out of memory (fake)" in str(e.value)


def test_startup_timeout_reports_log_tail(script: Path, tmp_path: Path) -> None:
    (h,) = launch_servers(1, "m", 0, ["--extra", "1"], tmp_path, command=_cmd(script, "hang"))
    try:
        t0 = time.monotonic()
        _wait_for_log(h.log_path, "starting")
        with pytest.raises(SGLangError, match=r"not healthy after 1s \(GET /health_generate\)") as e:
            h.wait_healthy(timeout_s=1.0, poll_s=0.1)
        assert time.monotonic() - t0 < 10
        assert "fake sglang 0 starting" in str(e.value)
        assert "--extra 1" in h.log_path.read_text().splitlines()[0]  # extra_args appended to the command
    finally:
        h.terminate(timeout_s=5)
    assert _gone(h.process.pid)


def _wait_for_log(path: Path, text: str) -> None:
    deadline = time.monotonic() + 15
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


def test_engine_launches_from_config_and_shuts_down(script: Path, tmp_path: Path) -> None:
    cfg = SGLangConfig(num_servers=1, model_path="m", base_port=0, launch_command=_cmd(script),
                       log_dir=str(tmp_path / "logs"), startup_timeout_s=15)
    engine = SGLangEngine(cfg)
    pid = engine.client.handles[0].process.pid
    assert engine.generate([[7, 8]], SamplingParams(n=2))[0][1].token_ids == [15, 2]
    engine.shutdown()
    assert _gone(pid)
    bad = SGLangConfig(num_servers=1, model_path="m", base_port=0, launch_command=_cmd(script, "crash"),
                       log_dir=str(tmp_path / "bad"), startup_timeout_s=15)
    with pytest.raises(SGLangError, match="exited with code 3"):
        SGLangEngine(bad)


def test_unknown_placeholder_in_launch_command(tmp_path: Path) -> None:
    from spark_mcore.config.loader import ConfigError

    with pytest.raises(ConfigError, match=r"sglang.launch_command: unknown placeholder 'gpu'"):
        launch_servers(1, "m", 0, [], tmp_path, command=["{python}", "--gpu", "{gpu}"])
