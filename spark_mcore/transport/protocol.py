"""Messages between the trainer's stream endpoint and rollout workers (pickle-free, see `wire`).

  worker -> trainer
    hello      {worker, incarnation, capacity, held, session, seen_seq}   registers (or re-registers)
    heartbeat  {worker, incarnation, capacity, held, session, seen_seq}   every transport.heartbeat_s
               held: sample ids the worker holds (queued, generating or unacked); seen_seq: the
               highest `assign.seq` it received from trainer `session` (-1 = none)
    result     {worker, incarnation, sample_id, policy_version, lengths, texts, finish, rewards,
                reward_samples, gen_s}  + tensors prompt_ids int32 [P], token_ids int32 [sum(lengths)],
                                          logprobs float32 [sum(lengths)] (absent without engine log-probs)
    results    {results: [result meta, ...], prompt_lens: [P_i], token_lens: [T_i]}  2..MAX_BATCH
                results that were ready together, in one message: the same tensors, each the
                members' arrays end to end (member i's are the slices at the running offsets of
                prompt_lens / token_lens); all members have log-probs or none does
    bye        {worker, incarnation}
  trainer -> worker
    welcome    {session, policy_version}                                  answers hello / heartbeat
    assign     {session, seq, policy_version, items: [{sample_id, prompt, params, step, index, recycle}]}
    ack        {session, ids: [sample_id]}                                 results taken (or not wanted)
    version    {session, policy_version}                                   new weights on the engines

A `results` message is framing around results that are each validated exactly like a single
`result` (`decode_results`): a broken frame (header, lengths that do not add up to the frames, a
member count outside 2..MAX_BATCH) rejects the whole message; a member that fails its own checks
is rejected alone and the others are taken. Workers coalesce only results already finished
(never wait for more), up to transport.batch_max_results and about transport.batch_max_bytes.
A result carries no prompt: the trainer rebuilds the group from its own record of the
assignment, so a worker cannot change what it was asked. Token ids and log-probs travel as raw
tensor frames (one per message), so a group costs one copy, not a Python list per token.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spark_mcore.transport.records import (
    _expect_map,
    _float,
    _int,
    _str,
    prompt_from_wire,
    prompt_to_wire,
    reward_sample_from_wire,
    reward_sample_to_wire,
    try_prompt_from_wire,
)
from spark_mcore.transport.wire import _TORCH_TO_WIRE, WireError, encode
from spark_mcore.types import Completion, Prompt, RewardSample, Rollout, RolloutGroup

HELLO, HEARTBEAT, RESULT, RESULTS, BYE = "hello", "heartbeat", "result", "results", "bye"
WELCOME, ASSIGN, ACK, VERSION = "welcome", "assign", "ack", "version"
_PARAM_KEYS = {"n", "temperature", "top_p", "max_new_tokens", "seed", "stop_token_ids"}
MAX_ID_CHARS = 200
MAX_HELD = 100_000
MAX_BATCH = 256  # results in one `results` message


@dataclass
class WorkItem:
    """One prompt to turn into a verified group. `step`/`index` seed SPARK's recycling exactly as
    the in-process recycler would (policy step, position of the group in that step)."""

    sample_id: str
    prompt: Prompt
    params: dict[str, Any]
    step: int = 0
    index: int = 0
    recycle: bool = False


@dataclass
class WorkResult:
    """A verified group as a worker returns it. `candidates` are the SPARK reward tasks recycled
    from it (judge and/or reflection, before the per-step caps, which the trainer applies)."""

    sample_id: str
    worker: str
    policy_version: int
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    candidates: list[RewardSample] = field(default_factory=list)
    gen_s: float = 0.0

    def to_group(self, prompt: Prompt) -> RolloutGroup:
        return RolloutGroup(prompt=prompt, rollouts=[
            Rollout(prompt, list(self.prompt_ids), c, reward=r, policy_version=self.policy_version)
            for c, r in zip(self.completions, self.rewards, strict=True)])


# --- work items ---------------------------------------------------------------------------------


def item_to_wire(item: WorkItem) -> dict[str, Any]:
    return {"sample_id": item.sample_id, "prompt": prompt_to_wire(item.prompt), "params": dict(item.params),
            "step": item.step, "index": item.index, "recycle": item.recycle}


def _sample_id(v: Any, where: str) -> str:
    s = _str(v, where)
    if not s or len(s) > MAX_ID_CHARS:
        raise WireError(f"{where}: sample ids are 1..{MAX_ID_CHARS} characters, got {len(s)}")
    return s


_ITEM_KEYS = {"sample_id", "prompt", "params", "step", "index", "recycle"}


def item_from_wire(d: Any, where: str = "item") -> WorkItem:
    # one expression on msgpack's exact types first; the checks that name the field only on failure
    if not (type(d) is dict and d.keys() == _ITEM_KEYS and type(d["params"]) is dict and d["params"].keys() <= _PARAM_KEYS
            and type(d["recycle"]) is bool and type(d["step"]) is int and type(d["index"]) is int
            and type(d["sample_id"]) is str and 0 < len(d["sample_id"]) <= MAX_ID_CHARS):
        d = _expect_map(d, where, _ITEM_KEYS)
        _expect_map(d["params"], f"{where}.params", set(), frozenset(_PARAM_KEYS))
        if not isinstance(d["recycle"], bool):
            raise WireError(f"{where}.recycle: expected a bool, got {d['recycle']!r}")
        _sample_id(d["sample_id"], f"{where}.sample_id")
        _int(d["step"], f"{where}.step")
        _int(d["index"], f"{where}.index")
    prompt = try_prompt_from_wire(d["prompt"]) or prompt_from_wire(d["prompt"], f"{where}.prompt")
    return WorkItem(sample_id=d["sample_id"], prompt=prompt, params=dict(d["params"]), step=d["step"],
                    index=d["index"], recycle=d["recycle"])


# --- results ------------------------------------------------------------------------------------


def result_tensors(res: WorkResult) -> dict[str, torch.Tensor]:
    """The raw frames of a result: prompt ids, all responses' token ids and log-probs, flat."""
    def flat(lists: list[list[Any]], dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.asarray(x, dtype=dtype) for x in lists]) if lists
                                else np.zeros(0, dtype=dtype))

    tensors = {"prompt_ids": torch.from_numpy(np.asarray(res.prompt_ids, dtype=np.int32)),
               "token_ids": flat([c.token_ids for c in res.completions], np.int32)}
    if res.completions and all(c.logprobs is not None for c in res.completions):
        tensors["logprobs"] = flat([c.logprobs for c in res.completions], np.float32)
    return tensors


def result_meta(res: WorkResult, incarnation: str) -> dict[str, Any]:
    return {"worker": res.worker, "incarnation": incarnation, "sample_id": res.sample_id,
            "policy_version": res.policy_version, "lengths": [len(c.token_ids) for c in res.completions],
            "texts": [c.text for c in res.completions], "finish": [c.finish_reason for c in res.completions],
            "rewards": [float(r) for r in res.rewards],
            "reward_samples": [reward_sample_to_wire(s) for s in res.candidates], "gen_s": float(res.gen_s)}


def encode_result(res: WorkResult, incarnation: str) -> list[Any]:
    """Frames of one `result` message (see the module docstring)."""
    return encode(RESULT, result_meta(res, incarnation), result_tensors(res))


def encode_results(parts: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> list[Any]:
    """Frames of one message for results that are ready together: (`result_meta`, `result_tensors`)
    pairs. One pair is a plain `result` message (zero-copy); more are a `results` message whose
    tensors are the members' arrays end to end (one copy, see the module docstring)."""
    if not parts:
        raise WireError("results: nothing to encode")
    if len(parts) == 1:
        return encode(RESULT, *parts[0])
    if len(parts) > MAX_BATCH:
        raise WireError(f"results: {len(parts)} results in one message, at most {MAX_BATCH}")
    names = [name for name in _ARRAY_DTYPES if name in parts[0][1]]
    if any(t.keys() != parts[0][1].keys() for _, t in parts):
        raise WireError("results: members must all carry the same tensors (all with log-probs or none)")
    tensors = {name: torch.from_numpy(np.concatenate([t[name].numpy() for _, t in parts])) for name in names}
    meta = {"results": [m for m, _ in parts], "prompt_lens": [int(t["prompt_ids"].shape[0]) for _, t in parts],
            "token_lens": [int(t["token_ids"].shape[0]) for _, t in parts]}
    return encode(RESULTS, meta, tensors)


@dataclass
class ResultFrames:
    """A `result` message validated down to its arrays (read-only use: numpy views of the received
    frames, before any per-token Python objects exist); `to_result` builds the records."""

    meta: dict[str, Any]
    prompt_ids: np.ndarray  # int32 [P]
    token_ids: np.ndarray  # int32 [sum(lengths)]
    logprobs: np.ndarray | None  # float32 [sum(lengths)]

    def to_result(self) -> WorkResult:
        m = self.meta
        offsets = list(itertools.accumulate(m["lengths"], initial=0))
        ids = self.token_ids.tolist()
        lps = None if self.logprobs is None else self.logprobs.tolist()
        comps = [Completion(token_ids=ids[a:b], text=t, logprobs=None if lps is None else lps[a:b], finish_reason=f)
                 for a, b, t, f in zip(offsets[:-1], offsets[1:], m["texts"], m["finish"], strict=True)]
        return WorkResult(sample_id=m["sample_id"], worker=m["worker"], policy_version=m["policy_version"],
                          prompt_ids=self.prompt_ids.tolist(), completions=comps, rewards=list(m["rewards"]),
                          candidates=list(m["reward_samples"]), gen_s=m["gen_s"])


_RESULT_KEYS = {"worker", "incarnation", "sample_id", "policy_version", "lengths", "texts", "finish", "rewards",
                "reward_samples", "gen_s"}
_INT, _STR, _NUMBER = frozenset({int}), frozenset({str}), frozenset({int, float})
_MAX, _MIN = np.maximum.reduce, np.minimum.reduce  # (ndarray.max/min add a Python layer per call)
_ARRAY_DTYPES = {"prompt_ids": "int32", "token_ids": "int32", "logprobs": "float32"}


def _check_lists(m: dict[str, Any]) -> int:
    lengths, texts, finish, rewards = m["lengths"], m["texts"], m["finish"], m["rewards"]
    n = len(lengths) if type(lengths) is list else -1
    if not (type(texts) is list and type(finish) is list and type(rewards) is list
            and len(texts) == len(finish) == len(rewards) == n):
        for key in ("lengths", "texts", "finish", "rewards"):
            if not isinstance(m[key], list) or len(m[key]) != n:
                raise WireError(f"result.meta.{key}: expected a list of {max(n, 0)} entries (one per response)")
    # exact type checks (msgpack yields only int / float / str here; bool is not a number)
    if not set(map(type, lengths)) <= _INT or (lengths and min(lengths) < 0):
        raise WireError("result.meta.lengths: expected non-negative integers")
    if not set(map(type, texts)) <= _STR or not set(map(type, finish)) <= _STR:
        raise WireError("result.meta.texts/finish: expected strings")
    if not set(map(type, rewards)) <= _NUMBER or not all(map(math.isfinite, rewards)):
        raise WireError("result.meta.rewards: expected finite numbers")
    return n


def _array(arrays: dict[str, Any], name: str, size: int | None, where: str = "result") -> np.ndarray:
    """The validated 1-D array `name` of a result. `arrays`: `wire.decode_arrays`' (dtype, array)
    pairs, or torch tensors."""
    entry = arrays.get(name)
    if entry is None:
        raise WireError(f"{where}.tensors.{name}: missing")
    want = _ARRAY_DTYPES[name]
    if isinstance(entry, torch.Tensor):
        dtype, shape = _TORCH_TO_WIRE.get(entry.dtype, str(entry.dtype)), entry.shape
        a = entry.numpy() if dtype == want else None
    else:
        (dtype, a), shape = entry, entry[1].shape
    if dtype != want or len(shape) != 1 or (size is not None and shape[0] != size):
        raise WireError(f"{where}.tensors.{name}: expected {want} [{'P' if size is None else size}], "
                        f"got {dtype} {list(shape)}")
    return a


def _check_ids(name: str, a: np.ndarray, max_token_id: int) -> None:
    """0 <= id < max_token_id (or < 2**31 without a bound) in one pass: negative int32 values
    are >= 2**31 when read as uint32."""
    # (compared as numpy scalars: int() of one costs more than the max over 8k ids)
    if a.size and _MAX(a.view(np.uint32)) >= min(max_token_id or 1 << 31, 1 << 31):
        raise WireError(f"result.tensors.{name}: token ids outside [0, {max_token_id or 'inf'})")


def _check_meta(meta: Any) -> dict[str, Any]:
    """The fields of a result's meta (everything but its tensors and reward samples)."""
    m = _expect_map(meta, "result.meta", _RESULT_KEYS)
    _sample_id(m["sample_id"], "result.meta.sample_id")
    if type(m["worker"]) is not str:
        _str(m["worker"], "result.meta.worker")
    if type(m["policy_version"]) is not int or m["policy_version"] < 0:
        if _int(m["policy_version"], "result.meta.policy_version") < 0:
            raise WireError("result.meta.policy_version: must be >= 0")
    if type(m["gen_s"]) is not float:
        _float(m["gen_s"], "result.meta.gen_s")
    _check_lists(m)
    return m


def _check_values(prompt_ids: np.ndarray, token_ids: np.ndarray, logprobs: np.ndarray | None, max_token_id: int) -> None:
    """Token ids in range, log-probs finite and <= 0."""
    # numpy, not torch, for these checks: torch's intra-op threads cost more than the work here
    _check_ids("prompt_ids", prompt_ids, max_token_id)
    _check_ids("token_ids", token_ids, max_token_id)
    if logprobs is not None and logprobs.size:
        top = _MAX(logprobs)  # NaN propagates into max; inf fails the bound
        if not (top <= 1e-3 and math.isfinite(top)) or not math.isfinite(_MIN(logprobs)):
            raise WireError("result.tensors.logprobs: expected finite values <= 0")


def _finish(m: dict[str, Any], prompt_ids: np.ndarray, token_ids: np.ndarray, logprobs: np.ndarray | None) -> ResultFrames:
    samples = m["reward_samples"]
    if type(samples) is not list or len(samples) > 2:
        raise WireError("result.meta.reward_samples: expected a list of at most 2 (judge, reflection)")
    if samples:
        m["reward_samples"] = [reward_sample_from_wire(s, f"result.meta.reward_samples[{i}]")
                               for i, s in enumerate(samples)]
    return ResultFrames(meta=m, prompt_ids=prompt_ids, token_ids=token_ids, logprobs=logprobs)


def decode_result(meta: dict[str, Any], arrays: dict[str, Any], max_token_id: int = 0) -> ResultFrames:
    """Validates a decoded `result` message: required fields and types, one length/text/finish/
    reward per response, tensor dtypes and sizes, token ids in range, finite log-probs <= 0.
    `arrays`: from `wire.decode_arrays` (or torch tensors from `wire.decode`)."""
    m = _check_meta(meta)
    if len(arrays) > 3 or arrays.keys() - _ARRAY_DTYPES.keys():
        raise WireError(f"result.tensors: unknown tensor(s) {sorted(arrays.keys() - _ARRAY_DTYPES.keys())}")
    total = sum(m["lengths"])
    prompt_ids = _array(arrays, "prompt_ids", None)
    token_ids = _array(arrays, "token_ids", total)
    logprobs = _array(arrays, "logprobs", total) if "logprobs" in arrays else None
    _check_values(prompt_ids, token_ids, logprobs, max_token_id)
    return _finish(m, prompt_ids, token_ids, logprobs)


def _lens(m: dict[str, Any], key: str, n: int) -> list[int]:
    lens = m[key]
    if type(lens) is not list or len(lens) != n or not set(map(type, lens)) <= _INT or min(lens) < 0:
        raise WireError(f"results.meta.{key}: expected {n} non-negative integers (one per result)")
    return lens


def decode_results(meta: dict[str, Any], arrays: dict[str, Any], max_token_id: int = 0) -> list[ResultFrames | WireError]:
    """Validates a decoded `results` message (see the module docstring). Raises WireError when
    the framing is broken (the whole message is rejected); otherwise returns, per member in
    order, its ResultFrames or the WireError that rejects that member alone. Each member passes
    exactly `decode_result`'s checks; the value checks (token ids, log-probs) run once over the
    whole arrays and, only if they fail there, per member to find the bad ones."""
    m = _expect_map(meta, "results.meta", {"results", "prompt_lens", "token_lens"})
    metas = m["results"]
    n = len(metas) if type(metas) is list else -1
    if not 2 <= n <= MAX_BATCH:
        raise WireError(f"results.meta.results: expected a list of 2..{MAX_BATCH} result metas, got "
                        f"{n if n >= 0 else type(metas).__name__}")
    plens, tlens = _lens(m, "prompt_lens", n), _lens(m, "token_lens", n)
    if len(arrays) > 3 or arrays.keys() - _ARRAY_DTYPES.keys():
        raise WireError(f"results.tensors: unknown tensor(s) {sorted(arrays.keys() - _ARRAY_DTYPES.keys())}")
    prompt_ids = _array(arrays, "prompt_ids", sum(plens), "results")
    token_ids = _array(arrays, "token_ids", sum(tlens), "results")
    logprobs = _array(arrays, "logprobs", token_ids.shape[0], "results") if "logprobs" in arrays else None
    try:
        _check_values(prompt_ids, token_ids, logprobs, max_token_id)
        checked = True
    except WireError:
        checked = False
    out: list[ResultFrames | WireError] = []
    p0 = t0 = 0
    for i in range(n):
        p1, t1 = p0 + plens[i], t0 + tlens[i]
        try:
            out.append(_member(metas[i], prompt_ids[p0:p1], token_ids[t0:t1],
                               None if logprobs is None else logprobs[t0:t1], max_token_id, checked))
        except WireError as e:
            out.append(e)
        p0, t0 = p1, t1
    return out


def _member(meta: Any, prompt_ids: np.ndarray, token_ids: np.ndarray, logprobs: np.ndarray | None,
            max_token_id: int, checked: bool) -> ResultFrames:
    """One member of a `results` message, checked as `decode_result` checks a single result (the
    value checks skipped when they already passed over the whole message: `checked`)."""
    m = _check_meta(meta)
    if sum(m["lengths"]) != token_ids.shape[0]:
        raise WireError(f"result.meta.lengths: the responses have {sum(m['lengths'])} tokens, but "
                        f"results.meta.token_lens gives this result {token_ids.shape[0]}")
    if not checked:
        _check_values(prompt_ids, token_ids, logprobs, max_token_id)
    return _finish(m, prompt_ids, token_ids, logprobs)


# --- small control messages -----------------------------------------------------------------------


@dataclass
class PeerReport:
    """What a hello / heartbeat says about its worker."""

    worker: str
    incarnation: str
    capacity: int
    held: set[str]
    session: str
    seen_seq: int


def check_peer(meta: dict[str, Any], kind: str) -> PeerReport:
    """Validates a hello / heartbeat."""
    m = _expect_map(meta, f"{kind}.meta", {"worker", "incarnation", "capacity", "held", "session", "seen_seq"})
    worker, inc = _str(m["worker"], f"{kind}.meta.worker"), _str(m["incarnation"], f"{kind}.meta.incarnation")
    if not 0 < len(worker) <= MAX_ID_CHARS or not 0 < len(inc) <= MAX_ID_CHARS:
        raise WireError(f"{kind}.meta.worker/incarnation: 1..{MAX_ID_CHARS} characters")
    capacity = _int(m["capacity"], f"{kind}.meta.capacity")
    if capacity < 0:
        raise WireError(f"{kind}.meta.capacity: must be >= 0")
    held = m["held"]
    if not isinstance(held, list) or len(held) > MAX_HELD or not all(isinstance(x, str) for x in held):
        raise WireError(f"{kind}.meta.held: expected a list of sample id strings")
    return PeerReport(worker, inc, capacity, set(held), _str(m["session"], f"{kind}.meta.session"),
                      _int(m["seen_seq"], f"{kind}.meta.seen_seq"))


__all__ = ["WorkItem", "WorkResult", "ResultFrames", "item_to_wire", "item_from_wire", "encode_result", "encode_results",
           "result_meta", "result_tensors", "decode_result", "decode_results", "check_peer", "PeerReport", "HELLO",
           "HEARTBEAT", "RESULT", "RESULTS", "BYE", "WELCOME", "ASSIGN", "ACK", "VERSION", "MAX_BATCH"]
