"""The one-pass value checks of a result's bulk frames: log-probs travel with the sign bit set
(finite and <= 0, -0.0 for 0), texts as UTF-8 bytes (all-ASCII proven by one max, anything else
decoded strictly per response), token ids in range."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spark_mcore.transport.batch import decode_results, encode_results
from spark_mcore.transport.protocol import (
    LOGPROB_TOLERANCE,
    WorkResult,
    decode_result,
    result_meta,
    result_tensors,
    wire_logprobs,
)
from spark_mcore.transport.wire import WireError, decode_arrays
from spark_mcore.types import Completion

F32_MAX = float(np.finfo(np.float32).max)


def _res(sid: str, texts: list[str], lps: list[float] | None = (-1.0, -1.0)) -> WorkResult:
    comps = [Completion([1, 2], t, None if lps is None else list(lps)) for t in texts]
    return WorkResult(sid, "w", 0, [7], comps, [0.0] * len(texts))


def _frames(*results: WorkResult) -> list[bytes]:
    return [bytes(memoryview(f)) for f in encode_results([(result_meta(r, "i"), result_tensors(r)) for r in results])]


def _decode(frames: list[bytes], max_token_id: int = 0):
    msg_type, meta, arrays = decode_arrays(frames)
    return decode_result(meta, arrays, max_token_id) if msg_type == "result" else decode_results(meta, arrays, max_token_id)


def test_wire_logprobs_sends_zero_and_rounding_noise_as_negative_zero() -> None:
    lp = np.array([0.0, -0.0, 5e-4, LOGPROB_TOLERANCE, -2.5, 0.5, np.nan, np.inf, -np.inf], dtype=np.float32)
    out = wire_logprobs(lp.copy())
    assert [math.copysign(1.0, x) for x in out[:4]] == [-1.0] * 4 and not out[:4].any()
    assert out[4] == np.float32(-2.5) and out[5] == np.float32(0.5)  # a real positive is left to be rejected
    assert math.isnan(out[6]) and out[7] == np.inf and out[8] == -np.inf


@pytest.mark.parametrize("value", [-0.0, -1e-40, -1e-3, -30.0, -F32_MAX])
def test_finite_non_positive_log_probs_pass(value: float) -> None:
    got = _decode(_frames(_res("a", ["x"], [value, -1.0])))
    assert got.logprobs[0] == np.float32(value)


@pytest.mark.parametrize("value", [0.0, 1e-6, 0.5, math.inf, -math.inf, math.nan, -math.nan])
def test_log_probs_that_are_positive_or_not_finite_are_rejected(value: float) -> None:
    frames = _frames(_res("a", ["x"], [-1.0, -1.0]))
    lps = np.frombuffer(frames[3], dtype="<f4").copy()
    lps[1] = value  # +0.0 too: the worker's frames carry -0.0 (`wire_logprobs`)
    with pytest.raises(WireError, match="logprobs"):
        _decode([*frames[:3], lps.tobytes(), frames[4]])


def test_worker_frames_round_trip_zero_and_tiny_positive_log_probs() -> None:
    got = _decode(_frames(_res("a", ["x"], [0.0, 1e-4]))).to_result()
    assert got.completions[0].logprobs == [0.0, 0.0]


@pytest.mark.parametrize("texts", [["plain", ""], ["é 数学 ∑", "🙂 ok"], ["", ""]])
def test_texts_round_trip_ascii_or_not(texts: list[str]) -> None:
    assert [c.text for c in _decode(_frames(_res("a", texts))).to_result().completions] == texts


def test_a_lone_surrogate_travels_as_a_replacement_not_a_failure() -> None:
    got = _decode(_frames(_res("a", ["x\ud800y", "é"]))).to_result()
    assert [c.text for c in got.completions] == ["x?y", "é"]


def test_invalid_utf8_is_rejected_naming_the_response() -> None:
    frames = _frames(_res("a", ["ok", "é!"]))
    bad = frames[4][:2] + b"\xc3\x28" + frames[4][4:]  # a broken two-byte sequence in response 1
    with pytest.raises(WireError, match="response 1 is not valid UTF-8"):
        _decode([*frames[:4], bad])
    # a character split across two responses' boundary: valid as a whole, not per response
    split = _frames(_res("b", ["a", "é"]))
    meta_shift = split[0].replace(b"\x92\x01\x02", b"\x92\x02\x01")  # text_lens [1, 2] -> [2, 1]
    with pytest.raises(WireError, match="not valid UTF-8"):
        _decode([meta_shift, *split[1:]])


def test_a_batch_rejects_only_the_member_with_bad_text() -> None:
    frames = _frames(_res("a", ["fine"]), _res("b", ["é"]), _res("c", ["ü"]))
    texts = bytearray(frames[4])
    texts[4 + 2 + 1] = 0x28  # member c's "ü" (0xc3 0xbc) -> 0xc3 0x28
    got = _decode([*frames[:4], bytes(texts)])
    assert [type(g).__name__ for g in got] == ["ResultFrames", "ResultFrames", "WireError"]
    assert got[1].to_result().completions[0].text == "é" and "UTF-8" in str(got[2])
