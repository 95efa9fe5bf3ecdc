"""Bucketed weight sync protocol, in one process: BucketSender (sync_once) -> HTTP -> the CPU
twin's RolloutServerApp, with a loopback stand-in for the broadcast group (the
real gloo group is exercised in tests/integration/test_weight_sync_tp.py)."""

from __future__ import annotations

import importlib.util
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2Config

from spark_mcore.rollout.hf_engine import HFEngine
from spark_mcore.rollout.sglang_engine import SGLangEngine
from spark_mcore.sglang.client import SGLangConfig, attach_servers, http_json
from spark_mcore.twin import app as server_app
from spark_mcore.twin.app import RolloutServerApp, tensor_sha256
from spark_mcore.twin.receiver import load_into
from spark_mcore.twin.server import RolloutHTTPServer
from spark_mcore.weights.bucket import pack_bucket
from spark_mcore.weights.config import WeightSyncConfig
from spark_mcore.weights.server_calls import ServerCalls, distributed_update_body
from spark_mcore.weights.sync import BucketSender, WeightSyncError, sync_once

_spec = importlib.util.spec_from_file_location("sglang_contract", Path(__file__).with_name("test_sglang_payloads.py"))
contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract)  # type: ignore[union-attr]


class _Received:
    """A sender-side work that completes once the receiver has taken the tensor, as with gloo
    (a buffer is sent only after the peer posted its receive) and NCCL (all ranks join)."""

    def __init__(self) -> None:
        self.taken = threading.Event()

    def is_completed(self) -> bool:
        return self.taken.is_set()

    def wait(self) -> bool:
        return self.taken.wait(30)


class LoopbackGroup:
    """Broadcast between two objects of one process: rank 0 enqueues, rank 1 dequeues."""

    device = torch.device("cpu")
    backend = "gloo"

    def __init__(self, rank: int, q: queue.Queue) -> None:
        self.rank, self.q = rank, q
        self.broadcasts = 0

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        self.broadcasts += 1
        if self.rank == 0:
            work = _Received()
            self.q.put((tensor.clone(), work))
            if not async_op:
                work.wait()
            return work if async_op else None
        sent, work = self.q.get(timeout=30)
        if sent.shape != tensor.shape:  # a receive posted for another bucket: the order broke
            raise RuntimeError(f"loopback broadcast: received {tuple(sent.shape)} into {tuple(tensor.shape)}")
        tensor.copy_(sent)
        work.taken.set()
        return work if async_op else None

    def destroy(self) -> None:
        pass


def _hf_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


class Setup:
    def __init__(self, config: WeightSyncConfig, allow_partial: bool = False, hf_config: Any = None) -> None:
        torch.manual_seed(0)
        self.app = RolloutServerApp(HFEngine(hf_config or _hf_config(), lambda ids: "", dtype=torch.float32),
                                    allow_partial_update=allow_partial)
        self.paths: list[tuple[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        routes = self.app.routes()
        self.app.routes = lambda: {p: self._logged(p, f) for p, f in routes.items()}  # type: ignore[method-assign]
        self.httpd = RolloutHTTPServer(self.app)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.q: queue.Queue = queue.Queue()
        q = self.q
        self.app.groups["weight_update_group"] = LoopbackGroup(1, q)  # type: ignore[assignment]
        self.config = config
        self.sender = BucketSender(config)
        self.sender.group = LoopbackGroup(0, q)  # type: ignore[assignment]
        self.engine = SGLangEngine(SGLangConfig(max_retries=0, control_timeout_s=30),
                                   handles=attach_servers([self.httpd.url]))
        self.calls = ServerCalls(self.engine.client)

    def push(self, named: Any, version: int) -> None:
        self.last = sync_once(self.sender, self.calls, self.config, named, version)
        self.engine.policy_version = version  # as the run's pusher does

    def _logged(self, path: str, fn: Any) -> Any:
        def call(body: Any) -> Any:
            self.paths.append((path, body))
            self.events.append(("arrive", path))
            out = fn(body)
            self.events.append(("answer", path))
            return out
        return call

    def new_state(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        return {n: torch.randn_like(p) for n, p in self.app.engine.model.named_parameters()}

    def close(self) -> None:
        self.engine.shutdown()
        self.calls.close()
        self.sender.close()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[Setup] = []

    def factory(**kw: Any) -> Setup:
        allow = kw.pop("allow_partial", False)
        made.append(Setup(WeightSyncConfig(**kw), allow))
        return made[-1]
    yield factory
    for s in made:
        s.close()


def test_full_sync_sequence_bitwise_and_version(make: Any) -> None:
    s = make(wire_dtype="fp32", bucket_mb=0.01, backend="gloo")  # ~10 KiB buckets -> several
    new = s.new_state()
    s.push(new.items(), version=3)
    paths = [p for p, _ in s.paths]
    n_updates = paths.count("/update_weights_from_distributed")
    assert paths == (["/pause_generation", "/flush_cache", "/begin_weight_update"]
                     + ["/update_weights_from_distributed"] * n_updates
                     + ["/end_weight_update", "/flush_cache", "/continue_generation"])
    assert n_updates == s.last.buckets >= 3 and s.last.tensors == len(new)
    assert s.app.groups["weight_update_group"].broadcasts == n_updates  # ONE collective per bucket
    for path, body in s.paths:
        cls = {"/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
               "/pause_generation": "PauseGenerationReqInput"}.get(path)
        if cls:
            assert contract.check_object(body, cls) == []
    first = dict(s.paths)["/update_weights_from_distributed"]
    assert first["load_format"] == "flattened_bucket" and first["weight_version"] == "3"
    assert first["flush_cache"] is False
    digest = http_json(s.httpd.url, "/debug/weights")
    assert digest["weight_version"] == "3" and s.engine.policy_version == 3
    for name, t in new.items():
        assert digest["weights"][name]["sha256"] == tensor_sha256(t), name
    out = http_json(s.httpd.url, "/generate", {"input_ids": [[1, 2, 3]], "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert out[0]["meta_info"]["weight_version"] == "3" and len(out[0]["output_ids"]) == 2


@pytest.mark.parametrize("pipelined", [True, False])
def test_next_bucket_is_queued_on_the_server_before_the_previous_answer(make: Any, monkeypatch: Any,
                                                                        pipelined: bool) -> None:
    """pipeline_requests: request k+1 goes out once broadcast k is done (every server is inside
    request k), so it waits on the server while k's weights load: no HTTP round trip between
    buckets. Off: k+1 goes out after k's answer. Either way the server receives in the sender's
    order (the loopback group fails on a mismatch) and ends with the new weights."""
    def slow_load(*args: Any) -> list[str]:
        time.sleep(0.2)  # under the server's model lock, like a large bucket's copy into the model
        return load_into(*args)

    monkeypatch.setattr(server_app, "load_into", slow_load)
    s = make(wire_dtype="fp32", bucket_mb=0.01, backend="gloo", pipeline_requests=pipelined)
    new = s.new_state()
    s.push(new.items(), version=2)
    updates = [e for e in s.events if e[1] == "/update_weights_from_distributed"]
    n = s.last.buckets
    assert n >= 3 and len(updates) == 2 * n
    arrive = [i for i, (kind, _) in enumerate(updates) if kind == "arrive"]
    answer = [i for i, (kind, _) in enumerate(updates) if kind == "answer"]
    ahead = [arrive[k + 1] < answer[k] for k in range(n - 1)]  # k+1 arrived before k's answer
    assert ahead == [pipelined] * (n - 1), updates
    digest = http_json(s.httpd.url, "/debug/weights")
    for name, t in new.items():
        assert digest["weights"][name]["sha256"] == tensor_sha256(t), name


def test_bf16_wire_and_per_tensor_protocol(make: Any) -> None:
    s = make(wire_dtype="bf16", load_format="per_tensor", bucket_mb=1.0, backend="gloo")
    new = s.new_state()
    s.push(new.items(), version=1)
    body = dict(s.paths)["/update_weights_from_distributed"]
    assert "load_format" not in body and set(body["dtypes"]) == {"bfloat16"}
    assert s.app.groups["weight_update_group"].broadcasts == len(new)  # per-tensor: one each
    params = dict(s.app.engine.model.named_parameters())
    for name, t in new.items():
        assert torch.equal(params[name].detach(), t.to(torch.bfloat16).float()), name


def test_server_refusal_is_reported_not_hung(make: Any) -> None:
    s = make(wire_dtype="fp32", weight_update_session=False, backend="gloo")
    with pytest.raises(WeightSyncError, match="between begin_weight_update"):
        s.push(s.new_state().items(), version=1)
    assert [p for p, _ in s.paths][-1] == "/continue_generation"  # the engine resumed generation anyway


class _NeverJoined:
    """A sender-side broadcast nobody receives: its work never completes."""

    device, backend = torch.device("cpu"), "gloo"

    def __init__(self) -> None:
        self.release = threading.Event()

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        release = self.release

        class Work:
            def is_completed(self) -> bool:
                return release.is_set()

            def wait(self) -> bool:
                return release.wait(60)
        return Work()

    def destroy(self) -> None:
        self.release.set()


def test_refusal_before_the_broadcast_fails_fast_and_marks_the_group(make: Any) -> None:
    import time

    s = make(wire_dtype="fp32", weight_update_session=False, backend="gloo")
    s.sender.group = _NeverJoined()  # type: ignore[assignment]
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="between begin_weight_update"):
        s.push(s.new_state().items(), version=1)
    assert time.monotonic() - start < 10  # not the 600 s collective timeout
    assert "during a bucket broadcast" in s.sender.broken
    with pytest.raises(WeightSyncError, match="out of step after an earlier failure"):
        s.push(s.new_state().items(), version=2)


def test_unknown_name_and_partial_update_fail_with_names(make: Any) -> None:
    s = make(wire_dtype="fp32", backend="gloo")
    with pytest.raises(WeightSyncError, match="no parameter in the receiving model"):
        s.push([("model.bogus.weight", torch.zeros(2))], version=1)
    s.push(s.new_state().items(), version=2)  # the failed sync closed the session: next one works
    assert http_json(s.httpd.url, "/debug/weights")["weight_version"] == "2"
    s2 = make(wire_dtype="fp32", backend="gloo")
    partial = list(s2.new_state().items())[:3]
    with pytest.raises(WeightSyncError, match="/end_weight_update failed.*parameters were not updated in this session"):
        s2.push(partial, version=1)


def test_update_body_describes_bucket_tensors_in_order() -> None:
    header, _ = pack_bucket([("w", torch.zeros(2, 3)), ("b", torch.zeros(3))], wire_dtype=torch.bfloat16)
    body = distributed_update_body(header, "g", 7, flattened=True)
    assert body == {"names": ["w", "b"], "dtypes": ["bfloat16", "bfloat16"], "shapes": [[2, 3], [3]],
                    "group_name": "g", "flush_cache": False, "weight_version": "7", "load_format": "flattened_bucket"}
    assert contract.check_object(body, "UpdateWeightsFromDistributedReqInput") == []


def test_each_mode_has_its_stage_sender_and_unknown_modes_fail_at_config() -> None:
    from spark_mcore.config.loader import ConfigError
    from spark_mcore.weights.colocated import ColocatedSender
    from spark_mcore.weights.config import MODES
    from spark_mcore.weights.megatron_sync import stage_sender

    assert MODES == ("distributed", "colocated")
    assert isinstance(stage_sender(WeightSyncConfig(mode="distributed"), "g"), BucketSender)
    assert isinstance(stage_sender(WeightSyncConfig(mode="colocated"), "g"), ColocatedSender)
    with pytest.raises(ConfigError, match="weights.mode='ipc' is unknown.*'distributed', 'colocated'"):
        WeightSyncConfig(mode="ipc")


@pytest.mark.parametrize("kw,match", [({"bucket_mb": 0}, "weights.bucket_mb=0"),
                                      ({"master_port": 70000}, "weights.master_port=70000"),
                                      ({"pause_mode": "in_place"}, "flush before a sync fails"),
                                      ({"group_name": ""}, "weights.group_name")])
def test_config_validation_names_the_field(kw: dict, match: str) -> None:
    from spark_mcore.config.loader import ConfigError

    with pytest.raises(ConfigError, match=match):
        WeightSyncConfig(**kw)
    assert WeightSyncConfig(bucket_mb=0.5).bucket_bytes == 512 * 1024


def test_megatron_weight_sync_one_rank_and_failed_begin() -> None:
    from types import SimpleNamespace

    from spark_mcore.models.registry import get_adapter
    from spark_mcore.weights.megatron_sync import MegatronWeightSync

    spec = importlib.util.spec_from_file_location("export_helpers", Path(__file__).with_name("test_weights_export.py"))
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)  # type: ignore[union-attr]
    cfg = exp._cfg(False)
    adapter = get_adapter("qwen2", cfg)
    hf_state = exp._hf_state(cfg)
    model = exp._stage_module(adapter.hf_to_mcore(hf_state), 0, 1, 0, 1, False)  # tp 1, pp 1
    s = Setup(WeightSyncConfig(), hf_config=adapter.hf_config(cfg, cfg.vocab_size))
    ps = SimpleNamespace(rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=0, tp_group=None, pp_group=None)
    sync = MegatronWeightSync(WeightSyncConfig(wire_dtype="fp32", bucket_mb=0.02, backend="gloo"), adapter, ps,
                              client=s.engine.client)
    sync.sender.group = LoopbackGroup(0, s.q)  # type: ignore[assignment, union-attr]
    try:
        stats = sync.sync(model, version=5)
        paths = [p for p, _ in s.paths]
        assert paths[:3] == ["/pause_generation", "/flush_cache", "/begin_weight_update"]
        assert paths[-3:] == ["/end_weight_update", "/flush_cache", "/continue_generation"]
        assert stats is not None and stats.tensors == len(hf_state) and sync.policy_version == 5
        digest = http_json(s.httpd.url, "/debug/weights")
        assert digest["weight_version"] == "5"
        assert all(digest["weights"][n]["sha256"] == tensor_sha256(t) for n, t in hf_state.items())
        s.app.begin_update()  # a session left open by someone else: /begin_weight_update is refused
        s.paths.clear()
        with pytest.raises(WeightSyncError, match="/begin_weight_update failed.*already open"):
            sync.sync(model, version=6)
        assert [p for p, _ in s.paths][-1] == "/continue_generation"  # generation resumed after the failure
        assert sync.policy_version == 5
    finally:
        sync.close()
        s.close()
