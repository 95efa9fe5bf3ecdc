"""Pure builders of SGLang native-API request bodies, and the /generate response parser.

Field names and types follow SGLang 0.5.23 (`sglang/srt/managers/io_struct.py`: GenerateReqInput,
InitWeightsUpdateGroupReqInput, UpdateWeightsFromDistributedReqInput,
UpdateWeightsFromTensorReqInput, PauseGenerationReqInput, ContinueGenerationReqInput; and
`sglang/api/v1/api_types.py`, the JSON contract /generate checks, whose SamplingParams *rejects*
unknown keys). tests/unit/test_sglang_payloads.py checks every builder against the field specs
extracted from that release (tests/unit/sglang_io_struct_fields.json), so a drift fails a test.

Sampling: prompts are expanded client side (each prompt repeated n times, SGLang's `n` left at
1). SGLang orders an `n > 1` batch prompt-major too, but expanding here makes the order ours,
gives every sample its own seed, and lets a failed chunk be re-sent sample by sample.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from spark_mcore.types import Completion, SamplingParams

DEFAULT_GROUP_NAME = "weight_update_group"  # SGLang's default for the NCCL weight-update group
PauseMode = Literal["abort", "retract", "in_place"]


class SGLangResponseError(ValueError):
    """A server answered with a body that does not match the /generate response format."""


class SGLangAbortedError(RuntimeError):
    """SGLang aborted a request (finish_reason.type == "abort"), e.g. while paused: re-send it."""


@dataclass(frozen=True)
class SampleRequest:
    """One sample to generate: sample `sample_index` of prompt `prompt_index`."""

    prompt_index: int
    sample_index: int
    input_ids: list[int]
    image_data: list[str] = field(default_factory=list)


def _check_ids(ids: Any, where: str) -> None:
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{where}: expected a non-empty list of token ids (ints), got {ids!r:.80}")


def expand_requests(prompt_ids: Sequence[list[int]], n: int,
                    image_data: Sequence[list[str]] | None = None) -> list[SampleRequest]:
    """Prompt-major expansion: [p0 s0, p0 s1, ..., p1 s0, ...]."""
    if n < 1:
        raise ValueError(f"params.n: must be >= 1, got {n}")
    if image_data is not None and len(image_data) != len(prompt_ids):
        raise ValueError(f"image_data: {len(image_data)} entries for {len(prompt_ids)} prompts (one list per prompt)")
    out = []
    for i, ids in enumerate(prompt_ids):
        _check_ids(ids, f"prompt_ids[{i}]")
        images = list(image_data[i]) if image_data is not None else []
        out.extend(SampleRequest(i, j, list(ids), images) for j in range(n))
    return out


def build_sampling_params(params: SamplingParams, sampling_seed: int | None = None) -> dict[str, Any]:
    """SGLang `sampling_params` for one sample. Temperature 0 is greedy in SGLang."""
    if params.max_new_tokens < 1:
        raise ValueError(f"params.max_new_tokens: must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0 or not 0 < params.top_p <= 1:
        raise ValueError(f"params: temperature must be >= 0 and top_p in (0, 1], got {params.temperature}, {params.top_p}")
    sp: dict[str, Any] = {
        "max_new_tokens": int(params.max_new_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        # Keep special tokens in the text: the verifier and the templates see exactly what was generated.
        "skip_special_tokens": False,
    }
    if params.stop_token_ids:
        sp["stop_token_ids"] = [int(t) for t in params.stop_token_ids]
    if sampling_seed is not None:
        sp["sampling_seed"] = int(sampling_seed)
    return sp


def build_generate_payload(requests: Sequence[SampleRequest], params: SamplingParams) -> dict[str, Any]:
    """Body of POST /generate for a batch of samples (always the batch form: a list of id lists).

    Sample (i, j) gets `params.sample_seeds[i][j]`, or seed + i * n + j with only `params.seed`
    set, so the result does not depend on how samples are split into requests or which server
    runs them.
    """
    if not requests:
        raise ValueError("requests: at least one sample is needed")
    for k, r in enumerate(requests):
        _check_ids(r.input_ids, f"requests[{k}].input_ids")
    payload: dict[str, Any] = {"input_ids": [list(r.input_ids) for r in requests], "return_logprob": True}
    seeds = params.seeds_for(max(r.prompt_index for r in requests) + 1) if params.sample_seeds is None \
        else params.sample_seeds
    if seeds is None:
        payload["sampling_params"] = build_sampling_params(params)
    else:
        payload["sampling_params"] = [build_sampling_params(params, seeds[r.prompt_index][r.sample_index])
                                      for r in requests]
    if any(r.image_data for r in requests):
        # A list per request (possibly empty) so SGLang reads it as "images of request k".
        payload["image_data"] = [list(r.image_data) for r in requests]
    return payload


def _finish_type(meta: dict[str, Any], where: str) -> str:
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or not isinstance(reason.get("type"), str):
        raise SGLangResponseError(f"{where}.meta_info.finish_reason: expected {{type: ...}}, got {reason!r}")
    if reason["type"] == "abort":
        raise SGLangAbortedError(f"{where}: request aborted by the server: {reason.get('message')}")
    return reason["type"]


def _parse_one(item: Any, where: str) -> Completion:
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise SGLangResponseError(f"{where}: expected a map with meta_info, got {str(item)[:200]}")
    meta = item["meta_info"]
    finish = _finish_type(meta, where)
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise SGLangResponseError(f"{where}.meta_info.output_token_logprobs: missing (was return_logprob sent?)")
    for k, e in enumerate(entries):
        if not isinstance(e, list) or len(e) < 2 or not isinstance(e[1], int):
            raise SGLangResponseError(f"{where}.meta_info.output_token_logprobs[{k}]: expected [logprob, token_id, text]")
    ids = item.get("output_ids")
    ids = [e[1] for e in entries] if ids is None else ids
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise SGLangResponseError(f"{where}.output_ids: expected a list of ints")
    if [e[1] for e in entries] != ids:
        raise SGLangResponseError(f"{where}: output_token_logprobs token ids differ from output_ids")
    values = [e[0] for e in entries]
    logprobs = [float(v) for v in values] if all(isinstance(v, (int, float)) for v in values) else None
    text = item.get("text")
    return Completion(token_ids=list(ids), text=text if isinstance(text, str) else "", logprobs=logprobs,
                      finish_reason=finish)


def parse_generate_response(body: Any, expected: int) -> list[Completion]:
    """Completions of a batch /generate answer, in request order.

    Raises SGLangAbortedError when any item was aborted (the chunk should be re-sent) and
    SGLangResponseError for a body that does not match the documented format.
    """
    if isinstance(body, dict) and "meta_info" in body and expected == 1:  # single-request form
        body = [body]
    if not isinstance(body, list):
        raise SGLangResponseError(f"/generate: expected a list of {expected} results, got {str(body)[:200]}")
    if len(body) != expected:
        raise SGLangResponseError(f"/generate: {len(body)} results for {expected} requests")
    return [_parse_one(item, f"/generate[{k}]") for k, item in enumerate(body)]


# --- weight updates and control -----------------------------------------------------------------


def tensor_metadata(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str], list[list[int]]]:
    """(names, dtypes, shapes) as SGLang expects them: dtype strings like "bfloat16"."""
    names, dtypes, shapes = [], [], []
    for name, t in named_tensors:
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append([int(s) for s in t.shape])
    return names, dtypes, shapes


def build_init_weights_update_group_payload(master_address: str, master_port: int, rank_offset: int,
                                            world_size: int, group_name: str = DEFAULT_GROUP_NAME,
                                            backend: str = "nccl") -> dict[str, Any]:
    """Body of POST /init_weights_update_group: the server's ranks are rank_offset.. in a group
    of world_size whose rank 0 (the trainer) listens on master_address:master_port."""
    if not master_address:
        raise ValueError("master_address: the trainer's reachable host/IP is required")
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port: must be in 1..65535, got {master_port}")
    if not 1 <= rank_offset < world_size:
        raise ValueError(f"rank_offset: must be in [1, world_size={world_size}) (rank 0 is the trainer), got {rank_offset}")
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def build_update_weights_from_distributed_payload(
        names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
        group_name: str = DEFAULT_GROUP_NAME, weight_version: str | None = None,
        flush_cache: bool = True) -> dict[str, Any]:
    """Body of POST /update_weights_from_distributed: the server then receives each tensor, in
    this order, by a broadcast from rank 0 of `group_name`."""
    if not names:
        raise ValueError("names: at least one tensor is needed")
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes: lengths differ ({len(names)}, {len(dtypes)}, {len(shapes)})")
    payload: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes),
                               "shapes": [[int(s) for s in shape] for shape in shapes],
                               "group_name": group_name, "flush_cache": bool(flush_cache)}
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def build_update_weights_from_tensor_payload(serialized_named_tensors: Sequence[bytes],
                                             weight_version: str | None = None, flush_cache: bool = True,
                                             load_format: str | None = None) -> dict[str, Any]:
    """Body of POST /update_weights_from_tensor. `serialized_named_tensors` holds one opaque blob
    per TP rank, produced by SGLang's own serializer on the sender (CUDA IPC handles, colocated
    only); HTTP carries them base64-encoded. We never decode these blobs ourselves."""
    if not serialized_named_tensors or not all(isinstance(b, (bytes, bytearray)) for b in serialized_named_tensors):
        raise ValueError("serialized_named_tensors: expected a non-empty list of bytes (one per TP rank)")
    payload: dict[str, Any] = {
        "serialized_named_tensors": [base64.b64encode(bytes(b)).decode("ascii") for b in serialized_named_tensors],
        "flush_cache": bool(flush_cache),
    }
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    if load_format is not None:
        payload["load_format"] = load_format
    return payload


def build_pause_generation_payload(mode: PauseMode = "abort") -> dict[str, Any]:
    """Body of POST /pause_generation. "abort" returns in-flight requests as aborted,
    "retract" requeues them, "in_place" keeps their KV cache (flush_cache then fails)."""
    if mode not in ("abort", "retract", "in_place"):
        raise ValueError(f"mode: must be 'abort', 'retract' or 'in_place', got {mode!r}")
    return {"mode": mode}


def build_continue_generation_payload() -> dict[str, Any]:
    return {}


def build_destroy_weights_update_group_payload(group_name: str = DEFAULT_GROUP_NAME) -> dict[str, Any]:
    return {"group_name": group_name}


def build_flush_cache_payload(timeout_s: float | None = None) -> dict[str, Any]:
    """FlushCacheReqInput: with timeout_s the server waits that long for running requests to
    finish before flushing (without it, a flush right after a pause answers 400 until idle)."""
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"flush timeout_s={timeout_s} must be > 0")
    return {} if timeout_s is None else {"timeout_s": float(timeout_s)}


__all__ = [
    "SampleRequest", "SGLangResponseError", "SGLangAbortedError", "expand_requests", "build_sampling_params",
    "build_generate_payload", "parse_generate_response", "tensor_metadata",
    "build_init_weights_update_group_payload", "build_update_weights_from_distributed_payload",
    "build_update_weights_from_tensor_payload", "build_pause_generation_payload", "build_flush_cache_payload",
    "build_continue_generation_payload", "build_destroy_weights_update_group_payload",
]
