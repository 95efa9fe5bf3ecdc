"""Messages between the trainer's stream endpoint and rollout workers (pickle-free, see `wire`).

  worker -> trainer
    hello      {worker, incarnation, capacity, held, session, seen_seq, max_message_bytes, idle_s}  registers
    heartbeat  (the same fields)                                     every transport.heartbeat_s
               held: sample ids the worker holds (queued, generating or unacked); seen_seq: the
               highest `assign.seq` it received from trainer `session` (-1 = none);
               max_message_bytes: the largest message the worker takes (its transport setting);
               idle_s: seconds its generation has waited for work since the worker started
    result     {worker, incarnation, sample_id, policy_version, lengths, text_lens, finish, rewards,
                reward_samples, gen_s}  + tensors prompt_ids int32 [P], token_ids int32 [sum(lengths)],
                                          logprobs float32 [sum(lengths)] (absent without engine log-probs),
                                          texts uint8 [sum(text_lens)] (the responses' UTF-8, end to end)
    results    {worker, incarnation, sample_ids, policy_versions, gen_s, counts, prompt_lens, reward_samples,
                lengths, text_lens, finish, rewards}: 2..MAX_BATCH results that were ready together, in
                one message, column-wise (one list per field); the same tensors, each the members'
                arrays end to end; all members have log-probs or none (`transport.batch`)
    bye        {worker, incarnation}
  trainer -> worker
    welcome    {session, policy_version, max_message_bytes}               answers hello / heartbeat
    assign     {session, seq, policy_version, items: [{sample_id, prompt, params, step, index, recycle}]}
    ack        {session, ids: [sample_id]}                                 results taken (or not wanted)
    version    {session, policy_version}                                   new weights on the engines
    refuse     {reason}                  the worker must stop (a second live worker with its name)

A `results` message (`transport.batch`) is validated member by member exactly like a single
`result`: broken framing (header, counts and lengths that do not add up to the frames, a member
count outside 2..MAX_BATCH) rejects the whole message; a member that fails its own checks is
rejected alone and the others are taken. Workers coalesce only results already finished
(never wait for more), up to transport.batch_max_results and about transport.batch_max_bytes; a
result of transport.batch_alone_bytes or more shares a message only if that needs no copy of its
arrays (`results_tensors`).
Both ends advertise their transport.max_message_bytes (hello, welcome): a worker sends results
sized to the smaller of the two, and one whose own limit is below the trainer's (assignments it
would drop) stops with an error that names both, while the trainer assigns it nothing.
A result carries no prompt: the trainer rebuilds the group from its own record of the
assignment, so a worker cannot change what it was asked. Token ids, log-probs and texts travel as
raw tensor frames (one per message), so a group costs one copy, not a Python object per token, and
the trainer validates them with one vectorised pass each before any Python object is built:
  token ids   0 <= id < transport.max_token_id (one max over the uint32 view)
  log-probs   finite and <= 0. They travel with the sign bit set: the worker writes -0.0 for a
              log-prob of 0 and for rounding noise in (0, LOGPROB_TOLERANCE] (`wire_logprobs`), so
              one max over the int32 view checks them (negative finite floats are exactly the
              int32 values <= that of -FLT_MAX; +0.0, positives, inf and NaN are all above it)
  texts       valid UTF-8: one max over the bytes proves the common all-ASCII case; otherwise
              each response is decoded strictly (and kept, so records do not decode it again)
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
WELCOME, ASSIGN, ACK, VERSION, REFUSE = "welcome", "assign", "ack", "version", "refuse"
_PARAM_KEYS = {"n", "temperature", "top_p", "max_new_tokens", "seed", "stop_token_ids"}
MAX_ID_CHARS = 200
MAX_HELD = 100_000
MAX_BATCH = 256  # results in one `results` message
# a lone surrogate (no detokenizer makes one) cannot be UTF-8: sent as "?" rather than failing the group
_UTF8_ERRORS = "replace"
LOGPROB_TOLERANCE = 1e-3  # engine log-probs up to this far above 0 are rounding noise (sent as -0.0)
_NEG_FINITE_MAX = int(np.array([-np.finfo(np.float32).max], dtype=np.float32).view(np.int32)[0])


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


def wire_logprobs(lp: np.ndarray) -> np.ndarray:
    """`lp` (float32, in place) as log-probs travel: -0.0 for 0 and for rounding noise in
    (0, LOGPROB_TOLERANCE]; anything else (NaN, inf, a larger positive value) is left for the
    trainer to reject (see the module docstring)."""
    lp[(lp >= 0) & (lp <= LOGPROB_TOLERANCE)] = -0.0
    return lp


def _flat(lists: list[list[Any]], dtype: type) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=dtype) for x in lists]) if lists else np.zeros(0, dtype=dtype)


def _has_logprobs(res: WorkResult) -> bool:
    return bool(res.completions) and all(c.logprobs is not None for c in res.completions)


def _text_tensor(text: str) -> torch.Tensor:
    buf = bytearray(text, "utf-8", _UTF8_ERRORS)  # (writable: no torch warning)
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)


def result_tensors(res: WorkResult) -> dict[str, torch.Tensor]:
    """The raw frames of a result: prompt ids, all responses' token ids, log-probs and texts, flat."""
    return results_tensors([res])[0]


def results_tensors(results: list[WorkResult]) -> list[dict[str, torch.Tensor]]:
    """`result_tensors` of results that are ready together, each column converted once for all of
    them: every result's tensors are views of one buffer per column, end to end in this order, so
    that `batch.encode_results` sends any run of them without copying their arrays again.
    Results that differ in carrying log-probs are converted one by one."""
    if not results:
        return []
    logprobs = {_has_logprobs(r) for r in results}
    if len(logprobs) > 1:
        return [result_tensors(r) for r in results]
    comps = [c for r in results for c in r.completions]
    tokens = [sum(len(c.token_ids) for c in r.completions) for r in results]
    texts = ["".join(c.text for c in r.completions) for r in results]
    columns = {"prompt_ids": (torch.from_numpy(_flat([r.prompt_ids for r in results], np.int32)),
                              [len(r.prompt_ids) for r in results]),
               "token_ids": (torch.from_numpy(_flat([c.token_ids for c in comps], np.int32)), tokens)}
    if logprobs.pop():
        columns["logprobs"] = (torch.from_numpy(wire_logprobs(_flat([c.logprobs for c in comps], np.float32))), tokens)
    columns["texts"] = (_text_tensor("".join(texts)), [_utf8_len(t) for t in texts])
    out: list[dict[str, torch.Tensor]] = [{} for _ in results]
    for name, (column, sizes) in columns.items():
        start = 0
        for tensors, size in zip(out, sizes, strict=True):
            tensors[name] = column[start:start + size]
            start += size
    return out


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", _UTF8_ERRORS))


def result_meta(res: WorkResult, incarnation: str) -> dict[str, Any]:
    """A result's header (its bulk data goes in `result_tensors`)."""
    return {"worker": res.worker, "incarnation": incarnation, "sample_id": res.sample_id,
            "policy_version": res.policy_version, "lengths": [len(c.token_ids) for c in res.completions],
            "text_lens": [_utf8_len(c.text) for c in res.completions],
            "finish": [c.finish_reason for c in res.completions],
            "rewards": [float(r) for r in res.rewards],
            "reward_samples": [reward_sample_to_wire(s) for s in res.candidates], "gen_s": float(res.gen_s)}


def encode_result(res: WorkResult, incarnation: str) -> list[Any]:
    """Frames of one `result` message (see the module docstring)."""
    return encode(RESULT, result_meta(res, incarnation), result_tensors(res))


@dataclass(slots=True)
class ResultFrames:
    """A `result` message validated down to its arrays (read-only use: numpy views of the received
    frames, before any per-token Python objects exist); `to_result` builds the records."""

    meta: dict[str, Any]
    prompt_ids: np.ndarray  # int32 [P]
    token_ids: np.ndarray  # int32 [sum(lengths)]
    logprobs: np.ndarray | None  # float32 [sum(lengths)]
    texts: np.ndarray | list[str]  # uint8 [sum(text_lens)] checked as ASCII, or the decoded texts

    def response_texts(self) -> list[str]:
        if isinstance(self.texts, list):
            return self.texts
        raw = self.texts.tobytes()
        offsets = list(itertools.accumulate(self.meta["text_lens"], initial=0))
        return [raw[a:b].decode("ascii") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def to_result(self) -> WorkResult:
        m = self.meta
        offsets = list(itertools.accumulate(m["lengths"], initial=0))
        ids = self.token_ids.tolist()
        lps = None if self.logprobs is None else self.logprobs.tolist()
        comps = [Completion(token_ids=ids[a:b], text=t, logprobs=None if lps is None else lps[a:b], finish_reason=f)
                 for a, b, t, f in zip(offsets[:-1], offsets[1:], self.response_texts(), m["finish"], strict=True)]
        return WorkResult(sample_id=m["sample_id"], worker=m["worker"], policy_version=m["policy_version"],
                          prompt_ids=self.prompt_ids.tolist(), completions=comps, rewards=list(m["rewards"]),
                          candidates=list(m["reward_samples"]), gen_s=m["gen_s"])


_RESULT_KEYS = {"worker", "incarnation", "sample_id", "policy_version", "lengths", "text_lens", "finish", "rewards",
                "reward_samples", "gen_s"}
_INT, _STR, _NUMBER = frozenset({int}), frozenset({str}), frozenset({int, float})
_MAX = np.maximum.reduce  # (ndarray.max adds a Python layer per call)
_ARRAY_DTYPES = {"prompt_ids": "int32", "token_ids": "int32", "logprobs": "float32", "texts": "uint8"}


def _check_lists(m: dict[str, Any]) -> int:
    lengths, text_lens, finish, rewards = m["lengths"], m["text_lens"], m["finish"], m["rewards"]
    n = len(lengths) if type(lengths) is list else -1
    if not (type(text_lens) is list and type(finish) is list and type(rewards) is list
            and len(text_lens) == len(finish) == len(rewards) == n):
        for key in ("lengths", "text_lens", "finish", "rewards"):
            if not isinstance(m[key], list) or len(m[key]) != n:
                raise WireError(f"result.meta.{key}: expected a list of {max(n, 0)} entries (one per response)")
    # exact type checks (msgpack yields only int / float / str here; bool is not a number)
    for key in ("lengths", "text_lens"):
        if not set(map(type, m[key])) <= _INT or (m[key] and min(m[key]) < 0):
            raise WireError(f"result.meta.{key}: expected non-negative integers")
    if not set(map(type, finish)) <= _STR:
        raise WireError("result.meta.finish: expected strings")
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


@dataclass
class _Bulk:
    """A result's (or a whole `results` message's) arrays, in wire order."""

    prompt_ids: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray | None
    texts: np.ndarray

    def member(self, p: slice, t: slice, b: slice) -> _Bulk:
        return _Bulk(self.prompt_ids[p], self.token_ids[t], None if self.logprobs is None else self.logprobs[t],
                     self.texts[b])


def _bulk(arrays: dict[str, Any], prompts: int | None, tokens: int, text_bytes: int, where: str) -> _Bulk:
    if arrays.keys() - _ARRAY_DTYPES.keys():
        raise WireError(f"{where}.tensors: unknown tensor(s) {sorted(arrays.keys() - _ARRAY_DTYPES.keys())}")
    return _Bulk(_array(arrays, "prompt_ids", prompts, where), _array(arrays, "token_ids", tokens, where),
                 _array(arrays, "logprobs", tokens, where) if "logprobs" in arrays else None,
                 _array(arrays, "texts", text_bytes, where))


def _check_values(bulk: _Bulk, max_token_id: int) -> bool:
    """Token ids in range and log-probs finite and <= 0, one pass each (see the module
    docstring); returns whether the texts are all ASCII (then valid UTF-8 as well)."""
    # numpy, not torch, for these checks: torch's intra-op threads cost more than the work here
    _check_ids("prompt_ids", bulk.prompt_ids, max_token_id)
    _check_ids("token_ids", bulk.token_ids, max_token_id)
    lp = bulk.logprobs
    if lp is not None and lp.size and _MAX(lp.view(np.int32)) > _NEG_FINITE_MAX:
        raise WireError("result.tensors.logprobs: expected finite values <= 0, sent with the sign bit set "
                        "(-0.0 for 0: build the frames with protocol.result_tensors)")
    return not bulk.texts.size or _MAX(bulk.texts) < 0x80


def _texts(m: dict[str, Any], texts: np.ndarray, ascii_only: bool) -> np.ndarray | list[str]:
    """The texts as ResultFrames keeps them: the checked ASCII bytes, or decoded strictly."""
    if ascii_only:
        return texts
    raw, out, a = texts.tobytes(), [], 0
    for i, n in enumerate(m["text_lens"]):
        try:
            out.append(raw[a:a + n].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise WireError(f"result.tensors.texts: response {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
        a += n
    return out


def _finish(m: dict[str, Any], bulk: _Bulk, ascii_only: bool) -> ResultFrames:
    samples = m["reward_samples"]
    if type(samples) is not list or len(samples) > 2:
        raise WireError("result.meta.reward_samples: expected a list of at most 2 (judge, reflection)")
    if samples:
        m["reward_samples"] = [reward_sample_from_wire(s, f"result.meta.reward_samples[{i}]")
                               for i, s in enumerate(samples)]
    return ResultFrames(meta=m, prompt_ids=bulk.prompt_ids, token_ids=bulk.token_ids, logprobs=bulk.logprobs,
                        texts=_texts(m, bulk.texts, ascii_only))


def decode_result(meta: dict[str, Any], arrays: dict[str, Any], max_token_id: int = 0) -> ResultFrames:
    """Validates a decoded `result` message: required fields and types, one length/text length/
    finish/reward per response, tensor dtypes and sizes, token ids in range, finite log-probs <= 0,
    UTF-8 texts. `arrays`: from `wire.decode_arrays` (or torch tensors from `wire.decode`)."""
    m = _check_meta(meta)
    bulk = _bulk(arrays, None, sum(m["lengths"]), sum(m["text_lens"]), "result")
    return _finish(m, bulk, _check_values(bulk, max_token_id))


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
    max_message_bytes: int
    idle_s: float


def check_peer(meta: dict[str, Any], kind: str) -> PeerReport:
    """Validates a hello / heartbeat."""
    m = _expect_map(meta, f"{kind}.meta", {"worker", "incarnation", "capacity", "held", "session", "seen_seq",
                                           "max_message_bytes", "idle_s"})
    worker, inc = _str(m["worker"], f"{kind}.meta.worker"), _str(m["incarnation"], f"{kind}.meta.incarnation")
    if not 0 < len(worker) <= MAX_ID_CHARS or not 0 < len(inc) <= MAX_ID_CHARS:
        raise WireError(f"{kind}.meta.worker/incarnation: 1..{MAX_ID_CHARS} characters")
    capacity = _int(m["capacity"], f"{kind}.meta.capacity")
    if capacity < 0:
        raise WireError(f"{kind}.meta.capacity: must be >= 0")
    held = m["held"]
    if not isinstance(held, list) or len(held) > MAX_HELD or not all(isinstance(x, str) for x in held):
        raise WireError(f"{kind}.meta.held: expected a list of sample id strings")
    limit = _int(m["max_message_bytes"], f"{kind}.meta.max_message_bytes")
    if limit < 1:
        raise WireError(f"{kind}.meta.max_message_bytes: must be >= 1, got {limit}")
    idle = _float(m["idle_s"], f"{kind}.meta.idle_s")
    if not 0.0 <= idle < math.inf:
        raise WireError(f"{kind}.meta.idle_s: must be a finite number >= 0, got {idle}")
    return PeerReport(worker, inc, capacity, set(held), _str(m["session"], f"{kind}.meta.session"),
                      _int(m["seen_seq"], f"{kind}.meta.seen_seq"), limit, float(idle))


__all__ = ["WorkItem", "WorkResult", "ResultFrames", "item_to_wire", "item_from_wire", "encode_result",
           "result_meta", "result_tensors", "decode_result", "check_peer", "PeerReport", "HELLO",
           "HEARTBEAT", "RESULT", "RESULTS", "BYE", "WELCOME", "ASSIGN", "ACK", "VERSION", "REFUSE", "MAX_BATCH"]
