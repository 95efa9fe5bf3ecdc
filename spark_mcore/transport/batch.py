"""The `results` message: several results of one worker that were ready together, column-wise.

  results  {worker, incarnation,
            per result (k = 2..MAX_BATCH):   sample_ids, policy_versions, gen_s, counts, prompt_lens,
                                             reward_samples
            per response (N = sum(counts)):  lengths, text_lens, finish, rewards}
           + the tensors of `result`, each the members' arrays end to end: prompt_ids int32
             [sum(prompt_lens)], token_ids int32 [sum(lengths)], logprobs float32 [sum(lengths)]
             (all members or none), texts uint8 [sum(text_lens)]

Member i owns responses counts[0] + ... + counts[i-1] onwards; its slices of the flat arrays follow
from its prompt_lens, lengths and text_lens. One list per field instead of one map per result:
the header unpacks into ~10 lists however many results it holds, and the type checks run once
per column, not once per member (at 1k tokens a message holds ~11 results).

Framing (reject the whole message): the field set, worker/incarnation, a member count outside
2..MAX_BATCH, a column of the wrong length, counts / prompt_lens / lengths / text_lens that are not
non-negative integers (they place every member's data) or that do not add up to the frames.
Everything else a single `result` checks (sample id, policy version, gen_s, finish, rewards,
reward samples, token ids, log-probs, UTF-8 texts) rejects one member alone: the checks run over
the whole message first and, only if one fails, per member (`protocol._check_meta` on the member's
rebuilt header) to find the bad ones. A member decodes to exactly what its own `result` message
decodes to.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from spark_mcore.transport.protocol import (
    _ARRAY_DTYPES,
    _INT,
    _NUMBER,
    _STR,
    MAX_BATCH,
    MAX_ID_CHARS,
    RESULT,
    RESULTS,
    ResultFrames,
    _Bulk,
    _bulk,
    _check_meta,
    _check_values,
    _finish,
)
from spark_mcore.transport.records import _expect_map
from spark_mcore.transport.wire import WireError, encode

PER_RESULT = ("sample_ids", "policy_versions", "gen_s", "counts", "prompt_lens", "reward_samples")
PER_RESPONSE = ("lengths", "text_lens", "finish", "rewards")
_KEYS = {"worker", "incarnation", *PER_RESULT, *PER_RESPONSE}
# per-result column -> the key of a single result's header
_SINGLE = {"sample_ids": "sample_id", "policy_versions": "policy_version", "gen_s": "gen_s",
           "reward_samples": "reward_samples"}
_FLOAT = frozenset({float})

Part = tuple[dict[str, Any], dict[str, torch.Tensor]]
# torch.cat copies an input of more than 32768 elements with its intra-op thread pool; on a busy
# host a worker's cat then waits for a descheduled pool thread (measured on the 2-core machine at
# load 4: 2 x 65536 int32, 12 ms; 0.1 ms in one thread). Larger members are joined by numpy,
# which never starts threads; smaller ones by torch.cat (one call, no per-member view).
_SERIAL_ELEMENTS = 32768


def span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensors as one view when they already lie end to end in one buffer, in this order
    (`protocol.results_tensors` makes them so); None when joining them needs a copy."""
    first = tensors[0]
    storage, start = first.untyped_storage().data_ptr(), first.storage_offset()
    offset = start
    for t in tensors:
        if (t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset or t.dim() != 1
                or (t.numel() > 1 and t.stride(0) != 1)):
            return None
        offset += t.numel()
    return first.as_strided((offset - start,), (1,), start)


def _join(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 1-D tensors end to end: a view when they already are (`span`), else one copy
    (`torch.cat`), never on torch's thread pool."""
    joined = span(tensors)
    if joined is not None:
        return joined
    if max(t.numel() for t in tensors) <= _SERIAL_ELEMENTS:
        return torch.cat(tensors)
    out = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
    np.concatenate([t.numpy() for t in tensors], out=out.numpy())
    return out


def encode_results(parts: list[Part]) -> list[Any]:
    """Frames of one message for results that are ready together: (`protocol.result_meta`,
    `protocol.result_tensors`) pairs of one worker incarnation. One pair is a plain `result`
    message (zero-copy); more are a `results` message, zero-copy when the members' arrays lie end
    to end (`protocol.results_tensors`), else with one copy of them."""
    if not parts:
        raise WireError("results: nothing to encode")
    if len(parts) == 1:
        return encode(RESULT, *parts[0])
    if len(parts) > MAX_BATCH:
        raise WireError(f"results: {len(parts)} results in one message, at most {MAX_BATCH}")
    keys = parts[0][1].keys()
    if any(t.keys() != keys for _, t in parts):
        raise WireError("results: members must all carry the same tensors (all with log-probs or none)")
    metas = [m for m, _ in parts]
    worker, inc = metas[0]["worker"], metas[0]["incarnation"]
    if any(m["worker"] != worker or m["incarnation"] != inc for m in metas):
        raise WireError("results: members must come from one worker incarnation")
    tensors = {name: _join([t[name] for _, t in parts]) for name in _ARRAY_DTYPES if name in keys}
    meta: dict[str, Any] = {"worker": worker, "incarnation": inc,
                            "counts": [len(m["lengths"]) for m in metas],
                            "prompt_lens": [int(t["prompt_ids"].shape[0]) for _, t in parts]}
    meta.update({col: [m[key] for m in metas] for col, key in _SINGLE.items()})
    meta.update({col: list(itertools.chain.from_iterable(m[col] for m in metas)) for col in PER_RESPONSE})
    return encode(RESULTS, meta, tensors)


def _column(m: dict[str, Any], key: str, n: int) -> list[Any]:
    col = m[key]
    if type(col) is not list or len(col) != n:
        raise WireError(f"results.meta.{key}: expected a list of {n} entries "
                        f"({'one per result' if key in PER_RESULT else 'one per response'})")
    return col


def _placement(m: dict[str, Any], key: str, n: int) -> list[int]:
    """A column that places data (counts, prompt_lens, lengths, text_lens): non-negative ints."""
    col = _column(m, key, n)
    if col and (not set(map(type, col)) <= _INT or min(col) < 0):
        raise WireError(f"results.meta.{key}: expected non-negative integers")
    return col


def _framing(m: Any) -> int:
    """The member count of a sound `results` header; raises WireError otherwise."""
    m = _expect_map(m, "results.meta", _KEYS)
    ids = m["sample_ids"]
    k = len(ids) if type(ids) is list else -1
    if not 2 <= k <= MAX_BATCH:
        raise WireError(f"results.meta.sample_ids: expected a list of 2..{MAX_BATCH} sample ids, got "
                        f"{k if k >= 0 else type(ids).__name__}")
    if type(m["worker"]) is not str or type(m["incarnation"]) is not str:
        raise WireError("results.meta.worker/incarnation: expected strings")
    n = sum(_placement(m, "counts", k))
    _placement(m, "prompt_lens", k)
    for key in ("lengths", "text_lens"):
        _placement(m, key, n)
    for key in PER_RESULT:
        _column(m, key, k)
    for key in PER_RESPONSE:
        _column(m, key, n)
    return k


def _columns_sound(m: dict[str, Any]) -> bool:
    """What `_check_meta` checks per result, once per column (exact msgpack types)."""
    ids, versions, rewards = m["sample_ids"], m["policy_versions"], m["rewards"]
    return (set(map(type, ids)) <= _STR and min(map(len, ids)) > 0 and max(map(len, ids)) <= MAX_ID_CHARS
            and set(map(type, versions)) <= _INT and min(versions) >= 0
            and set(map(type, m["gen_s"])) <= _FLOAT and set(map(type, m["finish"])) <= _STR
            and set(map(type, rewards)) <= _NUMBER and all(map(math.isfinite, rewards)))


def decode_results(meta: Any, arrays: dict[str, Any], max_token_id: int = 0) -> list[ResultFrames | WireError]:
    """Validates a decoded `results` message (see the module docstring). Raises WireError when
    the framing is broken (the whole message is rejected); otherwise returns, per member in
    order, its ResultFrames or the WireError that rejects that member alone."""
    k, m = _framing(meta), meta
    bulk = _bulk(arrays, sum(m["prompt_lens"]), sum(m["lengths"]), sum(m["text_lens"]), "results")
    try:
        ascii_only: bool | None = _check_values(bulk, max_token_id)
    except WireError:
        ascii_only = None  # some member is bad: each is checked on its own
    sound = _columns_sound(m)
    resp = [0, *itertools.accumulate(m["counts"])]
    tok = [0, *itertools.accumulate(m["lengths"])]
    txt = [0, *itertools.accumulate(m["text_lens"])]
    prm = [0, *itertools.accumulate(m["prompt_lens"])]
    # the common case: every check above passed and the texts are ASCII, so a member is its slices
    # (what `_member` builds, without a call chain per member)
    fast = sound and ascii_only
    pid, tid, lp, texts = bulk.prompt_ids, bulk.token_ids, bulk.logprobs, bulk.texts
    out: list[ResultFrames | WireError] = []
    for i in range(k):
        a, b = resp[i], resp[i + 1]
        mm = {"worker": m["worker"], "incarnation": m["incarnation"], "sample_id": m["sample_ids"][i],
              "policy_version": m["policy_versions"][i], "lengths": m["lengths"][a:b],
              "text_lens": m["text_lens"][a:b], "finish": m["finish"][a:b], "rewards": m["rewards"][a:b],
              "reward_samples": m["reward_samples"][i], "gen_s": m["gen_s"][i]}
        p, t, x = slice(prm[i], prm[i + 1]), slice(tok[a], tok[b]), slice(txt[a], txt[b])
        if fast and mm["reward_samples"] == []:
            out.append(ResultFrames(mm, pid[p], tid[t], None if lp is None else lp[t], texts[x]))
            continue
        part = bulk.member(p, t, x)
        try:
            out.append(_member(mm, part, max_token_id, sound, ascii_only))
        except WireError as e:
            out.append(e)
    return out


def _member(m: dict[str, Any], bulk: _Bulk, max_token_id: int, sound: bool, ascii_only: bool | None) -> ResultFrames:
    """One member, checked as `decode_result` checks a single result (the per-result and value
    checks skipped when they already passed over the whole message)."""
    if not sound:
        _check_meta(m)
    if ascii_only is None:
        ascii_only = _check_values(bulk, max_token_id)
    return _finish(m, bulk, ascii_only)


__all__ = ["encode_results", "decode_results", "span", "PER_RESULT", "PER_RESPONSE"]
