"""The records of spark_mcore.types as msgpack-able dicts, and back with validation.

`*_to_wire` produce plain dicts/lists/str/int/float/None; `*_from_wire` rebuild the dataclass
and raise WireError naming the dotted field (e.g. "groups[3].rollouts[1].completion.token_ids")
for a missing key, an unknown key, or a value of the wrong type. TrainBatch travels as named
tensors (see `train_batch_to_wire`).
"""

from __future__ import annotations

from typing import Any

import torch

from spark_mcore.transport.wire import WireError
from spark_mcore.types import (
    REWARD_KINDS,
    Completion,
    Prompt,
    RewardSample,
    Rollout,
    RolloutGroup,
    TrainBatch,
)


def _expect_map(d: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise WireError(f"{where}: expected a map, got {type(d).__name__}")
    if d.keys() == required:  # the common case, in one comparison
        return d
    missing = required - d.keys()
    if missing:
        raise WireError(f"{where}: missing field(s) {sorted(missing)}")
    unknown = d.keys() - required - optional
    if unknown:
        raise WireError(f"{where}: unknown field(s) {sorted(map(str, unknown))}; expected {sorted(required | optional)}")
    return d


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise WireError(f"{where}: expected a string, got {type(v).__name__} {v!r}")
    return v


def _int(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError(f"{where}: expected an integer, got {type(v).__name__} {v!r}")
    return v


def _float(v: Any, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise WireError(f"{where}: expected a number, got {type(v).__name__} {v!r}")
    return float(v)


def _int_list(v: Any, where: str) -> list[int]:
    if not isinstance(v, list):
        raise WireError(f"{where}: expected a list of integers, got {type(v).__name__}")
    for i, x in enumerate(v):
        _int(x, f"{where}[{i}]")
    return list(v)


def _float_list(v: Any, where: str) -> list[float]:
    if not isinstance(v, list):
        raise WireError(f"{where}: expected a list of numbers, got {type(v).__name__}")
    return [_float(x, f"{where}[{i}]") for i, x in enumerate(v)]


# --- Prompt -----------------------------------------------------------------------------------


def prompt_to_wire(p: Prompt) -> dict[str, Any]:
    return {"id": p.id, "messages": [dict(m) for m in p.messages], "answer": p.answer, "task": p.task,
            "images": list(p.images), "meta": dict(p.meta)}


_PROMPT_KEYS = {"id", "messages", "answer", "task", "images", "meta"}


def _prompt_ok(d: Any) -> bool:
    """`prompt_from_wire`'s checks as one expression on msgpack's exact types (no error text built
    per field on the happy path); False sends the prompt through the checks that name the field."""
    return (type(d) is dict and d.keys() == _PROMPT_KEYS and type(d["id"]) is str and type(d["answer"]) is str
            and type(d["task"]) is str and type(d["meta"]) is dict and type(d["images"]) is list
            and type(d["messages"]) is list and all(type(x) is str for x in d["images"])
            and all(type(m) is dict and all(type(k) is str and type(v) is str for k, v in m.items())
                    for m in d["messages"]))


def _check_prompt(d: Any, where: str) -> None:
    d = _expect_map(d, where, _PROMPT_KEYS)
    messages = d["messages"]
    if not isinstance(messages, list):
        raise WireError(f"{where}.messages: expected a list of {{role, content}} maps")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
            raise WireError(f"{where}.messages[{i}]: expected a map of strings (role/content), got {m!r}")
    images = d["images"]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise WireError(f"{where}.images: expected a list of path/URL strings, got {images!r}")
    if not isinstance(d["meta"], dict):
        raise WireError(f"{where}.meta: expected a map, got {type(d['meta']).__name__}")
    for key in ("id", "answer", "task"):
        _str(d[key], f"{where}.{key}")


def _build_prompt(d: dict[str, Any]) -> Prompt:
    return Prompt(id=d["id"], messages=[dict(m) for m in d["messages"]], answer=d["answer"], task=d["task"],
                  images=list(d["images"]), meta=dict(d["meta"]))


def try_prompt_from_wire(d: Any) -> Prompt | None:
    """`prompt_from_wire` on the happy path, None where that one would have to explain a failure
    (lets a caller build the field path only then)."""
    return _build_prompt(d) if _prompt_ok(d) else None


def prompt_from_wire(d: Any, where: str = "prompt") -> Prompt:
    if not _prompt_ok(d):
        _check_prompt(d, where)
    return _build_prompt(d)


# --- Completion / Rollout / RolloutGroup ----------------------------------------------------------


def completion_to_wire(c: Completion) -> dict[str, Any]:
    return {"token_ids": list(c.token_ids), "text": c.text,
            "logprobs": None if c.logprobs is None else [float(x) for x in c.logprobs],
            "finish_reason": c.finish_reason}


def completion_from_wire(d: Any, where: str = "completion") -> Completion:
    d = _expect_map(d, where, {"token_ids", "text", "logprobs", "finish_reason"})
    token_ids = _int_list(d["token_ids"], f"{where}.token_ids")
    logprobs = None if d["logprobs"] is None else _float_list(d["logprobs"], f"{where}.logprobs")
    if logprobs is not None and len(logprobs) != len(token_ids):
        raise WireError(f"{where}.logprobs: {len(logprobs)} values for {len(token_ids)} token_ids (must match)")
    return Completion(token_ids=token_ids, text=_str(d["text"], f"{where}.text"), logprobs=logprobs,
                      finish_reason=_str(d["finish_reason"], f"{where}.finish_reason"))


def rollout_to_wire(r: Rollout, include_prompt: bool = True) -> dict[str, Any]:
    """`include_prompt=False` is used inside a group, whose prompt is sent once."""
    out: dict[str, Any] = {"prompt_ids": list(r.prompt_ids), "completion": completion_to_wire(r.completion),
                           "reward": float(r.reward), "policy_version": int(r.policy_version)}
    if include_prompt:
        out["prompt"] = prompt_to_wire(r.prompt)
    return out


def rollout_from_wire(d: Any, where: str = "rollout", prompt: Prompt | None = None) -> Rollout:
    keys = {"prompt_ids", "completion", "reward", "policy_version"}
    d = _expect_map(d, where, keys if prompt is not None else keys | {"prompt"})
    return Rollout(
        prompt=prompt if prompt is not None else prompt_from_wire(d["prompt"], f"{where}.prompt"),
        prompt_ids=_int_list(d["prompt_ids"], f"{where}.prompt_ids"),
        completion=completion_from_wire(d["completion"], f"{where}.completion"),
        reward=_float(d["reward"], f"{where}.reward"),
        policy_version=_int(d["policy_version"], f"{where}.policy_version"),
    )


def group_to_wire(g: RolloutGroup) -> dict[str, Any]:
    for i, r in enumerate(g.rollouts):
        if r.prompt.id != g.prompt.id:
            raise WireError(f"group '{g.prompt.id}': rollouts[{i}].prompt.id is '{r.prompt.id}' (must be the group's)")
    return {"prompt": prompt_to_wire(g.prompt), "rollouts": [rollout_to_wire(r, include_prompt=False) for r in g.rollouts]}


def group_from_wire(d: Any, where: str = "group") -> RolloutGroup:
    d = _expect_map(d, where, {"prompt", "rollouts"})
    prompt = prompt_from_wire(d["prompt"], f"{where}.prompt")
    if not isinstance(d["rollouts"], list):
        raise WireError(f"{where}.rollouts: expected a list, got {type(d['rollouts']).__name__}")
    rollouts = [rollout_from_wire(r, f"{where}.rollouts[{i}]", prompt) for i, r in enumerate(d["rollouts"])]
    return RolloutGroup(prompt=prompt, rollouts=rollouts)


# --- RewardSample -------------------------------------------------------------------------------


def reward_sample_to_wire(s: RewardSample) -> dict[str, Any]:
    return {"kind": s.kind, "prompt": prompt_to_wire(s.prompt), "source_prompt_id": s.source_prompt_id,
            "label": s.label}


def reward_sample_from_wire(d: Any, where: str = "reward_sample") -> RewardSample:
    d = _expect_map(d, where, {"kind", "prompt", "source_prompt_id", "label"})
    if d["kind"] not in REWARD_KINDS:
        raise WireError(f"{where}.kind: {d['kind']!r} is not one of {list(REWARD_KINDS)}")
    return RewardSample(kind=d["kind"], prompt=prompt_from_wire(d["prompt"], f"{where}.prompt"),
                        source_prompt_id=_str(d["source_prompt_id"], f"{where}.source_prompt_id"),
                        label=_str(d["label"], f"{where}.label"))


# --- TrainBatch ---------------------------------------------------------------------------------

_BATCH_TENSORS = ("tokens", "loss_mask", "advantages", "old_logprobs", "ref_logprobs", "engine_logprobs")


def train_batch_to_wire(b: TrainBatch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) for `wire.encode`; absent optional tensors are simply not sent."""
    tensors = {k: getattr(b, k) for k in _BATCH_TENSORS if getattr(b, k) is not None}
    return {"kinds": list(b.kinds)}, tensors


def train_batch_from_wire(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str = "train_batch") -> TrainBatch:
    """Checks the shapes documented on TrainBatch: tokens/loss_mask/log-probs [B, T], advantages [B]."""
    for k in ("tokens", "loss_mask", "advantages"):
        if k not in tensors:
            raise WireError(f"{where}.{k}: tensor missing")
    unknown = tensors.keys() - set(_BATCH_TENSORS)
    if unknown:
        raise WireError(f"{where}: unknown tensor(s) {sorted(unknown)}")
    tokens = tensors["tokens"]
    if tokens.dim() != 2:
        raise WireError(f"{where}.tokens: expected shape [B, T], got {list(tokens.shape)}")
    for k in ("loss_mask", "old_logprobs", "ref_logprobs", "engine_logprobs"):
        if k in tensors and tensors[k].shape != tokens.shape:
            raise WireError(f"{where}.{k}: shape {list(tensors[k].shape)} != tokens shape {list(tokens.shape)}")
    if tensors["advantages"].shape != tokens.shape[:1]:
        raise WireError(f"{where}.advantages: shape {list(tensors['advantages'].shape)} != [B] = [{tokens.shape[0]}]")
    kinds = meta.get("kinds", [])
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise WireError(f"{where}.kinds: expected a list of strings, got {kinds!r}")
    return TrainBatch(tokens=tokens, loss_mask=tensors["loss_mask"], advantages=tensors["advantages"],
                      old_logprobs=tensors.get("old_logprobs"), ref_logprobs=tensors.get("ref_logprobs"),
                      engine_logprobs=tensors.get("engine_logprobs"),
                      kinds=list(kinds))


__all__ = [
    "prompt_to_wire", "prompt_from_wire", "try_prompt_from_wire", "completion_to_wire", "completion_from_wire",
    "rollout_to_wire", "rollout_from_wire", "group_to_wire", "group_from_wire",
    "reward_sample_to_wire", "reward_sample_from_wire", "train_batch_to_wire", "train_batch_from_wire",
]
