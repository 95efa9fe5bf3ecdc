"""State and request handlers of the CPU twin of an SGLang server (HTTP lives in server.py).

Behaviour copied from SGLang 0.5.23 where our client depends on it:
  * /generate: `input_ids` (one list or a batch), `sampling_params` (one map or one per
    request; unknown keys rejected), answers `text`, `output_ids` and `meta_info` with
    `finish_reason` ({"type": "stop", "matched": id} | {"type": "length", "length": n} |
    {"type": "abort", ...}), `output_token_logprobs` ([logprob, token_id, null] per token) and
    `weight_version` (the policy version the sample was generated with).
  * /pause_generation {"mode"}: later /generate calls wait for /continue_generation; with mode
    "abort" a generation that was running when the pause came answers finish_reason abort.
  * weight updates must happen between /begin_weight_update and /end_weight_update;
    /update_weights_from_distributed receives names/dtypes/shapes with load_format
    "flattened_bucket" (one uint8 broadcast per bucket) or none (one broadcast per tensor).
  * image_data (vision-language models): image references (paths, data URIs) per request,
    processed with the model directory's preprocessor_config.json; input_ids hold the
    expanded image pads (one per merged patch), checked against the processed images.
Differences: one model replica (TP 1, rank = rank_offset); batches run one at a time under a
lock (no continuous batching); /update_weights_from_tensor is refused (its body is a pickle);
/end_weight_update fails when some parameter was not updated in the session (unless
allow_partial_update), which catches a trainer that forgets tensors.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from spark_mcore.data.images import ImageError, PilDecoder, VisionProcessing, process_images
from spark_mcore.models.vision import VisionInputs, canonical_hf_name
from spark_mcore.rollout.hf_engine import HFEngine
from spark_mcore.twin.receiver import load_into, receive_bucket
from spark_mcore.types import SamplingParams
from spark_mcore.weights.bucket import BucketError, BucketHeader
from spark_mcore.weights.groups import WeightGroupError, WeightUpdateGroup, join_weight_update_group

Reply = tuple[int, Any]
_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "sampling_seed",
                  "skip_special_tokens", "min_new_tokens", "n"}


class RequestError(ValueError):
    """A request body is invalid (HTTP 400); the message names the field."""


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in body:
        if default is ...:
            raise RequestError(f"{key}: required field is missing")
        return default
    value = body[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise RequestError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    return value


def _ok(message: str) -> Reply:
    return 200, {"success": True, "message": message}


def _fail(message: str) -> Reply:
    return 400, {"success": False, "message": message}


def sampling_from_json(sp: Any, where: str) -> SamplingParams:
    """SGLang sampling_params map -> SamplingParams (n = 1); unknown keys are rejected."""
    if not isinstance(sp, dict):
        raise RequestError(f"{where}: expected a map, got {sp!r:.80}")
    unknown = set(sp) - _SAMPLING_KEYS
    if unknown:
        raise RequestError(f"{where}: unknown keys {sorted(unknown)}; supported: {sorted(_SAMPLING_KEYS)}")
    if sp.get("n", 1) != 1:
        raise RequestError(f"{where}.n: only 1 is supported (repeat the prompt instead)")
    stops = _field(sp, "stop_token_ids", list, [])
    if not all(isinstance(t, int) for t in stops):
        raise RequestError(f"{where}.stop_token_ids: expected a list of ints")
    seed = _field(sp, "sampling_seed", int, None) if sp.get("sampling_seed") is not None else None
    return SamplingParams(n=1, temperature=float(_field(sp, "temperature", (int, float), 1.0)),
                          top_p=float(_field(sp, "top_p", (int, float), 1.0)),
                          max_new_tokens=_field(sp, "max_new_tokens", int, 128), stop_token_ids=list(stops), seed=seed)


class RolloutServerApp:
    """An HFEngine behind SGLang's native endpoints (handlers return (status, json))."""

    def __init__(self, engine: HFEngine, model_path: str = "", allow_partial_update: bool = False,
                 gen_delay_s: float = 0.0, group_timeout_s: float = 600.0,
                 processing: VisionProcessing | None = None) -> None:
        self.engine, self.model_path = engine, model_path
        self.processing = processing  # vision-language models: how image_data is processed
        self.allow_partial_update, self.gen_delay_s, self.group_timeout_s = allow_partial_update, gen_delay_s, group_timeout_s
        self.weight_version = "0"
        self.groups: dict[str, WeightUpdateGroup] = {}
        self._model_lock = threading.Lock()  # generation and weight loading never overlap
        self._cond = threading.Condition()
        self._paused, self._pause_epoch = False, 0
        self.waiting = 0  # /generate requests held by a pause (observable by tests and operators)
        self.running = 0  # /generate requests past the pause check (their abort epoch is fixed)
        self._session: set[str] | None = None  # names updated in the open weight-update session
        self._recv_buffer: torch.Tensor | None = None  # reused by every bucket (grown to the largest)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, body: dict[str, Any]) -> Reply:
        if "text" in body:
            raise RequestError("text: the CPU twin takes token ids only (input_ids)")
        ids = _field(body, "input_ids", list)
        single = bool(ids) and all(isinstance(t, int) for t in ids)
        batch = [ids] if single else ids
        if not batch or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in batch):
            raise RequestError("input_ids: expected a non-empty list of token ids or a list of such lists")
        images = self._images(body.get("image_data"), batch, single)
        sps = body.get("sampling_params", {})
        if isinstance(sps, list) and len(sps) != len(batch):
            raise RequestError(f"sampling_params: {len(sps)} entries for {len(batch)} requests")
        params = [sampling_from_json(sps[i] if isinstance(sps, list) else sps, f"sampling_params[{i}]")
                  for i in range(len(batch))]
        with self._cond:
            self.waiting += 1
            while self._paused:
                self._cond.wait()
            self.waiting -= 1
            self.running += 1
            epoch = self._pause_epoch
        try:
            with self._model_lock:
                if self.gen_delay_s:
                    time.sleep(self.gen_delay_s)
                version = self.weight_version
                comps = [self.engine.generate([p], sp, **({"images": [im]} if im is not None else {}))[0][0]
                         for p, sp, im in zip(batch, params, images, strict=True)]
        finally:
            with self._cond:
                self.running -= 1
        aborted = self._pause_epoch != epoch
        out = [self._item(c, k, version, aborted) for k, c in enumerate(comps)]
        return 200, out[0] if single else out

    def _images(self, data: Any, batch: list[list[int]], single: bool) -> list[VisionInputs | None]:
        """`image_data` as SGLang takes it (one request: a reference or a list of them; a batch:
        one such entry per request) -> the processed images of each request, or None. The
        request's ids must hold as many image pads as the processing gives (SGLang's contract
        for input_ids with images; the trainer's data.image_min/max_pixels set both)."""
        if data is None:
            if self.processing is not None:  # pads without pixels would embed as plain tokens
                pad = self.engine.model.config.image_token_id
                if any(pad in ids for ids in batch):
                    raise RequestError(f"image_data: missing, but input_ids hold image pads (id {pad}); "
                                       "send the prompt's images with it")
            return [None] * len(batch)
        entries = [data] if single else data
        if not isinstance(entries, list) or len(entries) != len(batch):
            raise RequestError(f"image_data: expected one entry per request ({len(batch)}), got {data!r:.80}")
        out: list[VisionInputs | None] = []
        for k, (refs, ids) in enumerate(zip(entries, batch, strict=True)):
            refs = [refs] if isinstance(refs, str) else (refs or [])
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise RequestError(f"image_data[{k}]: expected image references (strings), got {refs!r:.80}")
            out.append(self._process(refs, ids, f"image_data[{k}]") if refs else None)
        return out

    def _process(self, refs: list[str], ids: list[int], where: str) -> VisionInputs:
        if self.processing is None:
            raise RequestError(f"{where}: this model has no vision tower (its directory has no "
                               "preprocessor_config.json); send token ids only")
        try:
            processed = process_images(PilDecoder().decode(refs), self.processing)
        except ImageError as e:
            raise RequestError(f"{where}: {e}") from e
        pads = sum(t == self.engine.model.config.image_token_id for t in ids)
        want = sum(processed.tokens_per_image(self.processing.merge_size))
        if pads != want:
            raise RequestError(f"{where}: input_ids hold {pads} image pads but the images give {want} "
                               f"(min_pixels={self.processing.min_pixels}, max_pixels={self.processing.max_pixels} "
                               "from preprocessor_config.json must be the trainer's data.image_min/max_pixels)")
        return VisionInputs(processed.pixel_values, processed.image_grid_thw)

    @staticmethod
    def _item(c: Any, k: int, version: str, aborted: bool) -> dict[str, Any]:
        if aborted:
            finish: dict[str, Any] = {"type": "abort", "message": "generation paused (abort) during the request"}
        elif c.finish_reason == "stop":
            finish = {"type": "stop", "matched": c.token_ids[-1]}
        else:
            finish = {"type": "length", "length": len(c.token_ids)}
        logprobs = c.logprobs or [0.0] * len(c.token_ids)
        return {"text": c.text, "output_ids": list(c.token_ids), "meta_info": {
            "id": f"req{k}", "finish_reason": finish, "completion_tokens": len(c.token_ids),
            "output_token_logprobs": [[float(lp), int(t), None] for lp, t in zip(logprobs, c.token_ids, strict=False)],
            "weight_version": version}}

    def pause(self, body: dict[str, Any]) -> Reply:
        mode = _field(body or {}, "mode", str, "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise RequestError(f"mode: {mode!r} is not one of abort, retract, in_place")
        with self._cond:
            self._paused = True
            self._pause_epoch += int(mode == "abort")
        return _ok(f"paused ({mode})")

    def resume(self, body: Any = None) -> Reply:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return _ok("continued")

    # -- weight-update group ------------------------------------------------------------------

    def init_group(self, body: dict[str, Any]) -> Reply:
        name = _field(body, "group_name", str, "weight_update_group")
        backend = _field(body, "backend", str, "nccl")
        if backend == "nccl" and not torch.cuda.is_available():
            return _fail("backend 'nccl' needs CUDA; the CPU twin runs on CPU: use backend 'gloo'")
        if name in self.groups:
            return _fail(f"group {name!r} already exists; /destroy_weights_update_group first")
        try:
            self.groups[name] = join_weight_update_group(
                _field(body, "master_address", str), _field(body, "master_port", int), _field(body, "rank_offset", int),
                _field(body, "world_size", int), name, backend, self.group_timeout_s)
        except WeightGroupError as e:
            return _fail(str(e))
        return _ok(f"joined weight-update group {name!r}")

    def destroy_group(self, body: dict[str, Any]) -> Reply:
        group = self.groups.pop(_field(body or {}, "group_name", str, "weight_update_group"), None)
        if group is None:
            return _fail("no such weight-update group")
        group.destroy()
        return _ok("destroyed")

    def close(self) -> None:
        for group in self.groups.values():
            group.destroy()
        self.groups.clear()

    # -- weight updates -----------------------------------------------------------------------

    def begin_update(self, body: Any = None) -> Reply:
        if self._session is not None:
            return _fail("a weight-update session is already open; call end_weight_update() first")
        self._session = set()
        return _ok("weight-update session open")

    def end_update(self, body: Any = None) -> Reply:
        if self._session is None:
            return _fail("no weight-update session is open; call begin_weight_update() first")
        updated, self._session = self._session, None
        params = set(self._params())
        missing = sorted(params - updated)
        if missing and updated and not self.allow_partial_update:
            return _fail(f"{len(missing)} parameters were not updated in this session, e.g. {missing[:3]}")
        return _ok(f"weight-update session closed ({len(updated)} tensors updated)")

    def update_from_distributed(self, body: dict[str, Any]) -> Reply:
        try:
            header = BucketHeader.from_sglang_lists(body.get("names"), body.get("dtypes"), body.get("shapes"))
        except BucketError as e:
            raise RequestError(str(e)) from e
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            raise RequestError(f"load_format: {load_format!r} is not supported (use 'flattened_bucket' or null)")
        group = self.groups.get(_field(body, "group_name", str, "weight_update_group"))
        if group is None:
            return _fail(f"group {body.get('group_name')!r} unknown; call /init_weights_update_group first")
        if self._session is None:  # SGLang 0.5.23 refuses too, before joining the broadcast
            return _fail("update_weights_from_distributed must run between begin_weight_update() and "
                         "end_weight_update()")
        with self._model_lock:
            if load_format == "flattened_bucket" and (self._recv_buffer is None or
                                                      self._recv_buffer.numel() < header.nbytes):
                self._recv_buffer = torch.empty(header.nbytes, dtype=torch.uint8, device=group.device)
            named = receive_bucket(group, header, flattened=load_format == "flattened_bucket",
                                   buffer=self._recv_buffer)
            try:
                names = load_into(self._params(), named)
            except BucketError as e:
                return _fail(f"received bucket does not fit the model: {e}")
            self._session.update(names)
            self._set_version(body.get("weight_version"))
        return _ok(f"updated {len(names)} tensors")

    def _params(self) -> dict[str, torch.Tensor]:
        """The model's parameters under checkpoint (hub) names, what trainers send and SGLang
        loads: transformers >= 5 keeps a VL model's as `model.visual.*` / `model.language_model.*`
        in memory, the hub as `visual.*` / `model.*` (text models: the same names)."""
        return {canonical_hf_name(n): p for n, p in self.engine.model.named_parameters()}

    def _set_version(self, version: Any) -> None:
        if version is None:
            return
        self.weight_version = str(version)
        if self.weight_version.isdigit():
            self.engine.policy_version = int(self.weight_version)

    def update_from_tensor(self, body: Any = None) -> Reply:
        return _fail("update_weights_from_tensor carries pickled CUDA IPC handles; the CPU twin never unpickles "
                     "and runs on CPU: use update_weights_from_distributed")

    # -- inspection ---------------------------------------------------------------------------

    def weights_digest(self, body: Any = None) -> Reply:
        """sha256 of every parameter's raw bytes (C order) plus dtype and shape."""
        with self._model_lock:
            out = {n: {"dtype": str(p.dtype).removeprefix("torch."), "shape": list(p.shape),
                       "sha256": tensor_sha256(p)} for n, p in self._params().items()}
        return 200, {"weight_version": self.weight_version, "weights": out}

    def get_weights_by_name(self, body: dict[str, Any]) -> Reply:
        name = _field(body, "name", str)
        truncate = _field(body, "truncate_size", int, 100)
        params = self._params()
        name = canonical_hf_name(name)
        if name not in params:
            return 400, {"success": False, "message": f"no parameter {name!r}"}
        return 200, params[name].detach().flatten()[:truncate].float().tolist()

    def model_info(self, body: Any = None) -> Reply:
        return 200, {"model_path": self.model_path, "weight_version": self.weight_version, "is_generation": True}

    def server_info(self, body: Any = None) -> Reply:
        """The ServerArgs fields clients check (spark_mcore.sglang.checks): one rank, and seeds
        are honoured (sampling_seed seeds the transformers engine)."""
        return 200, {"model_path": self.model_path, "tp_size": 1, "pp_size": 1, "dp_size": 1,
                     "enable_deterministic_inference": True, "weight_version": self.weight_version,
                     "version": "cpu-twin"}

    def routes(self) -> dict[str, Callable[[Any], Reply]]:
        return {"/generate": self.generate, "/pause_generation": self.pause, "/continue_generation": self.resume,
                "/flush_cache": lambda b: (200, "Cache flushed."), "/init_weights_update_group": self.init_group,
                "/destroy_weights_update_group": self.destroy_group, "/begin_weight_update": self.begin_update,
                "/end_weight_update": self.end_update, "/update_weights_from_distributed": self.update_from_distributed,
                "/update_weights_from_tensor": self.update_from_tensor, "/get_weights_by_name": self.get_weights_by_name,
                "/debug/weights": self.weights_digest, "/get_model_info": self.model_info,
                "/get_server_info": self.server_info,
                "/health": lambda b: (200, {"status": "ok"}), "/health_generate": lambda b: (200, {"status": "ok"})}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in C order (bf16 via its int16 bit pattern)."""
    cpu = t.detach().to("cpu").contiguous()
    if cpu.dtype == torch.bfloat16:
        cpu = cpu.view(torch.int16)
    return hashlib.sha256(cpu.numpy().tobytes()).hexdigest()


def dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


__all__ = ["RolloutServerApp", "RequestError", "sampling_from_json", "tensor_sha256"]
