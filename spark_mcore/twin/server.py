"""The CPU twin of an SGLang server: SGLang's native HTTP API on top of HFEngine.

    python -m spark_mcore.twin --model HF_DIR --port 0 --port-file /tmp/port

Serves SGLang's native endpoints (see app.py for what is and is not like SGLang 0.5.23)
on a threaded HTTP server bound to 127.0.0.1 by default. `--port 0` binds a free port; the
bound port is printed ("listening on http://HOST:PORT") and written to --port-file.
Launch it through `spark_mcore.sglang.client.launch_servers` (or `sglang.launch_command` in a run
config) with TWIN_SERVER_COMMAND to get the same process handling as real SGLang servers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from spark_mcore.twin.app import RequestError, RolloutServerApp

logger = logging.getLogger("spark_mcore.twin")

TWIN_SERVER_COMMAND = ["{python}", "-m", "spark_mcore.twin", "--model", "{model_path}",
                       "--host", "{host}", "--port", "{port}"]
MAX_BODY_BYTES = 256 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: RolloutHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, code: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY_BYTES:
            raise RequestError(f"body: {n} bytes exceeds {MAX_BODY_BYTES}")
        if not n:
            return {}
        try:
            return json.loads(self.rfile.read(n))
        except ValueError as e:
            raise RequestError(f"body: not valid JSON ({e})") from e

    def _dispatch(self) -> None:
        route = self.server.app.routes().get(self.path.split("?", 1)[0])
        if route is None:
            self._reply(404, {"success": False, "message": f"unknown endpoint {self.path}"})
            return
        try:
            body = self._body()
            if body is not None and not isinstance(body, dict):
                raise RequestError("body: expected a JSON object")
            code, payload = route(body)
            self._reply(code, payload)
            if self.path.startswith("/generate"):  # one line per batch: tests and operators follow progress
                logger.info("served /generate: %d samples, HTTP %d", len(payload) if isinstance(payload, list) else 1,
                            code)
        except RequestError as e:
            self._reply(400, {"success": False, "message": str(e), "error": {"message": str(e)}})
        except Exception as e:  # noqa: BLE001  (report to the client, keep serving)
            logger.error("%s failed:\n%s", self.path, traceback.format_exc())
            self._reply(500, {"success": False, "message": f"{type(e).__name__}: {e}"})

    do_GET = _dispatch
    do_POST = _dispatch
    do_PUT = _dispatch


class RolloutHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: RolloutServerApp, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.app = app

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _decoder(model_path: str) -> Any:
    """The checkpoint's tokenizer decode, or ids as text when the directory has no tokenizer
    (transformers would otherwise build an empty one from config.json alone)."""
    if not any(Path(model_path, f).is_file() for f in _TOKENIZER_FILES):
        return lambda ids: " ".join(str(i) for i in ids)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return lambda ids: tok.decode(ids)


def build_app(model_path: str, allow_partial_update: bool = False, gen_delay_s: float = 0.0) -> RolloutServerApp:
    from spark_mcore.rollout.hf_engine import HFEngine

    if not Path(model_path, "config.json").is_file():
        raise SystemExit(f"--model {model_path}: not a Hugging Face model directory (no config.json)")
    engine = HFEngine.from_pretrained(model_path, _decoder(model_path))
    pad = getattr(engine.model.config, "pad_token_id", None)
    engine.pad_token_id = int(pad) if pad is not None else 0
    processing = None
    if getattr(engine.model.config, "vision_config", None) is not None:  # image_data needs the processor's settings
        from spark_mcore.config.loader import ConfigError
        from spark_mcore.data.images import processing_from_dir

        try:
            processing = processing_from_dir(model_path)
        except ConfigError as e:
            raise SystemExit(f"--model {model_path}: {e}") from e
    return RolloutServerApp(engine, model_path, allow_partial_update, gen_delay_s, processing=processing)


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(f"{port}\n")
    os.replace(tmp, path)  # readers never see a half-written file


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port")
    ap.add_argument("--port-file", default=None, help="write the bound port here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--gen-delay-s", type=float, default=0.0, help="sleep per /generate request (tests)")
    ap.add_argument("--allow-partial-update", action="store_true",
                    help="do not fail /end_weight_update when some parameters were not updated")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stdout, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(max(1, args.threads))
    app = build_app(args.model, args.allow_partial_update, args.gen_delay_s)
    httpd = RolloutHTTPServer(app, args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    print(f"spark_mcore twin server listening on {httpd.url}", flush=True)
    if args.port_file:
        _write_port_file(args.port_file, httpd.server_address[1])
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        httpd.server_close()
        app.close()


if __name__ == "__main__":
    main()
