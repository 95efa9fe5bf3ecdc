"""Contract tests: every body our SGLang client builds must fit SGLang's own request classes.

The field specs (names, required-ness, annotation strings) were extracted from the sglang 0.5.23
wheel into sglang_io_struct_fields.json (see its _note and tests/contracts/extract_sglang_fields.py).
`conforms` interprets those annotation strings (Optional/Union/List/Dict/Literal/Annotated and the
module's aliases) and checks our values against them, so a renamed or retyped field on either
side fails here.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.sglang import payloads as P
from spark_mcore.types import Completion

SPEC = json.loads((Path(__file__).parent / "sglang_io_struct_fields.json").read_text())
CLASSES: dict[str, Any] = SPEC["classes"]
ALIASES: dict[str, str] = SPEC["aliases"]
_PRIMITIVES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "Any": lambda v: True,
}


def _b64(v: Any) -> bool:  # JSON has no bytes: SGLang's HTTP schema decodes base64 strings
    try:
        return isinstance(v, str) and base64.b64decode(v, validate=True) is not None
    except binascii.Error:
        return False


def _args(node: ast.Subscript) -> list[ast.expr]:
    return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]


def _check(v: Any, node: ast.expr, ns: str) -> bool:
    if isinstance(node, ast.Constant):
        return v is None if node.value is None else v == node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _check(v, node.left, ns) or _check(v, node.right, ns)
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = ast.unparse(node)
        if name in _PRIMITIVES:
            return _PRIMITIVES[name](v)
        if name == "bytes":
            return _b64(v)
        if f"{ns}{name}" in CLASSES:
            return not check_object(v, f"{ns}{name}")
        if name in ALIASES:
            return _check(v, ast.parse(ALIASES[name], mode="eval").body, ns)
        return False  # an SGLang-internal type (ImageData, torch objects...): never matches JSON values
    if isinstance(node, ast.Subscript):
        head, args = ast.unparse(node.value), _args(node)
        if head == "Optional":
            return v is None or _check(v, args[0], ns)
        if head == "Union":
            return any(_check(v, a, ns) for a in args)
        if head in ("List", "list", "Set", "Sequence", "Tuple"):
            return isinstance(v, list) and all(_check(x, args[0], ns) for x in v)
        if head in ("Dict", "dict"):
            return isinstance(v, dict) and all(_check(k, args[0], ns) and _check(x, args[1], ns) for k, x in v.items())
        if head == "Literal":
            return any(_check(v, a, ns) for a in args)
        if head == "Annotated":
            return _check(v, args[0], ns)
    raise AssertionError(f"annotation {ast.unparse(node)!r} is not understood by this checker")


def conforms(value: Any, annotation: str, ns: str = "") -> bool:
    return _check(value, ast.parse(annotation, mode="eval").body, ns)


def check_object(body: Any, cls: str) -> list[str]:
    """Violations of `body` against class `cls` of the spec (empty list = conforms)."""
    spec = CLASSES[cls]["fields"]
    ns = "api.v1." if cls.startswith("api.v1.") else ""
    if not isinstance(body, dict):
        return [f"{cls}: expected an object, got {type(body).__name__}"]
    errors = [f"{cls}: unknown field '{k}'" for k in body if k not in spec]
    errors += [f"{cls}: required field '{k}' missing" for k, f in spec.items() if f["required"] and k not in body]
    errors += [f"{cls}.{k}: {body[k]!r:.60} does not fit {spec[k]['annotation']}"
               for k in body if k in spec and not conforms(body[k], spec[k]["annotation"], ns)]
    return errors


def assert_fits(body: dict[str, Any], *classes: str) -> None:
    errors = [e for cls in classes for e in check_object(body, cls)]
    assert not errors, "\n".join(errors)


# --- the checker bites ----------------------------------------------------------------------------


def test_spec_is_from_the_pinned_release_and_has_the_classes_we_use() -> None:
    assert SPEC["sglang_version"] == "0.5.23"
    for cls in ("GenerateReqInput", "InitWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput",
                "UpdateWeightsFromTensorReqInput", "PauseGenerationReqInput", "ContinueGenerationReqInput",
                "api.v1.GenerateRequest", "api.v1.SamplingParams"):
        assert cls in CLASSES
    assert CLASSES["api.v1.SamplingParams"]["unknown_keys"] == "rejected"
    assert CLASSES["InitWeightsUpdateGroupReqInput"]["fields"]["master_port"] == {
        "annotation": "int", "required": True, "default": None}


def test_checker_rejects_drift() -> None:
    assert check_object({"max_tokens": 5}, "api.v1.SamplingParams") == ["api.v1.SamplingParams: unknown field 'max_tokens'"]
    assert check_object({"temperature": "hot"}, "SamplingParams") == [
        "SamplingParams.temperature: 'hot' does not fit float"]
    assert check_object({"master_address": "h", "master_port": 1, "world_size": 2}, "InitWeightsUpdateGroupReqInput") == [
        "InitWeightsUpdateGroupReqInput: required field 'rank_offset' missing"]
    assert check_object({"input_ids": [[1, "2"]]}, "api.v1.GenerateRequest") == [
        "api.v1.GenerateRequest.input_ids: [[1, '2']] does not fit Optional[TokenIdsOrList]"]
    assert check_object({"input_ids": [[1]], "sampling_params": {"max_tokens": 3}}, "api.v1.GenerateRequest") == [
        "api.v1.GenerateRequest.sampling_params: {'max_tokens': 3} does not fit Optional[SamplingParamsOrList]"]
    assert not conforms({"mode": "pause"}["mode"], CLASSES["PauseGenerationReqInput"]["fields"]["mode"]["annotation"])
    assert not conforms(["not base64!"], "Annotated[List[bytes], Base64Bytes()]")


# --- builders against the spec --------------------------------------------------------------------


def _reqs(n: int = 2, images: bool = False) -> list[P.SampleRequest]:
    return P.expand_requests([[1, 2, 3], [4, 5]], n, [["a.png"], []] if images else None)


@pytest.mark.parametrize("params,images", [
    (SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=16), False),
    (SamplingParams(n=2, temperature=0.0, max_new_tokens=8, stop_token_ids=[151645, 151643], seed=7), False),
    (SamplingParams(n=1, temperature=0.7, max_new_tokens=4), True),
])
def test_generate_payload_fits_sglang(params: SamplingParams, images: bool) -> None:
    body = P.build_generate_payload(_reqs(params.n, images), params)
    assert_fits(body, "GenerateReqInput", "api.v1.GenerateRequest")
    sps = body["sampling_params"] if isinstance(body["sampling_params"], list) else [body["sampling_params"]]
    for sp in sps:
        assert_fits(sp, "SamplingParams", "api.v1.SamplingParams")
    json.dumps(body)  # JSON-serialisable as sent


def test_generate_payload_exact_values() -> None:
    body = P.build_generate_payload(_reqs(2), SamplingParams(n=2, temperature=0.5, top_p=0.9, max_new_tokens=3,
                                                             stop_token_ids=[9], seed=100))
    assert body["input_ids"] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    assert body["return_logprob"] is True and "image_data" not in body
    assert [sp["sampling_seed"] for sp in body["sampling_params"]] == [100, 101, 102, 103]
    assert body["sampling_params"][0] == {"max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9,
                                          "skip_special_tokens": False, "stop_token_ids": [9], "sampling_seed": 100}
    vl = P.build_generate_payload(_reqs(1, images=True), SamplingParams(n=1))
    assert vl["image_data"] == [["a.png"], []]
    assert vl["sampling_params"] == {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "skip_special_tokens": False}


def test_generate_payload_validation() -> None:
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]: expected a non-empty list of token ids"):
        P.expand_requests([[1], []], 1)
    with pytest.raises(ValueError, match=r"image_data: 1 entries for 2 prompts"):
        P.expand_requests([[1], [2]], 1, [["x.png"]])
    with pytest.raises(ValueError, match=r"params.max_new_tokens"):
        P.build_generate_payload(_reqs(1), SamplingParams(max_new_tokens=0))


def test_weight_update_payloads_fit_sglang() -> None:
    init = P.build_init_weights_update_group_payload("10.0.0.1", 29500, rank_offset=3, world_size=5)
    assert init == {"master_address": "10.0.0.1", "master_port": 29500, "rank_offset": 3, "world_size": 5,
                    "group_name": "weight_update_group", "backend": "nccl"}
    assert_fits(init, "InitWeightsUpdateGroupReqInput")
    names, dtypes, shapes = P.tensor_metadata([("a.weight", torch.zeros(2, 3, dtype=torch.bfloat16)),
                                               ("b.bias", torch.zeros(4))])
    assert (names, dtypes, shapes) == (["a.weight", "b.bias"], ["bfloat16", "float32"], [[2, 3], [4]])
    dist = P.build_update_weights_from_distributed_payload(names, dtypes, shapes, weight_version="12")
    assert dist["weight_version"] == "12" and dist["flush_cache"] is True
    assert_fits(dist, "UpdateWeightsFromDistributedReqInput")
    tensor = P.build_update_weights_from_tensor_payload([b"\x00\x01", b"rank1"], weight_version="12")
    assert tensor["serialized_named_tensors"] == ["AAE=", "cmFuazE="]
    assert_fits(tensor, "UpdateWeightsFromTensorReqInput")
    assert_fits(P.build_pause_generation_payload("retract"), "PauseGenerationReqInput")
    assert_fits(P.build_continue_generation_payload(), "ContinueGenerationReqInput")
    assert_fits(P.build_destroy_weights_update_group_payload(), "DestroyWeightsUpdateGroupReqInput")
    assert_fits(P.build_flush_cache_payload(30.0), "FlushCacheReqInput")  # fault 10: flush waits for idle
    assert P.build_flush_cache_payload(30) == {"timeout_s": 30.0} and P.build_flush_cache_payload() == {}


def test_weight_update_payload_validation() -> None:
    with pytest.raises(ValueError, match=r"rank_offset: must be in \[1, world_size=3\)"):
        P.build_init_weights_update_group_payload("h", 1234, rank_offset=0, world_size=3)
    with pytest.raises(ValueError, match="names/dtypes/shapes: lengths differ"):
        P.build_update_weights_from_distributed_payload(["a"], ["float32", "float32"], [[1]])
    with pytest.raises(ValueError, match="mode: must be"):
        P.build_pause_generation_payload("pause")  # type: ignore[arg-type]


# --- the /generate response ---------------------------------------------------------------------


def _item(ids: list[int], finish: dict[str, Any], text: str | None = "t") -> dict[str, Any]:
    return {"text": text, "output_ids": ids, "meta_info": {
        "id": "r", "finish_reason": finish, "prompt_tokens": 3, "completion_tokens": len(ids),
        "output_token_logprobs": [[-0.5 * (k + 1), t, None] for k, t in enumerate(ids)]}}


def test_response_fields_we_read_exist_in_sglang_response_schema() -> None:
    assert {"text", "output_ids", "meta_info"} <= CLASSES["api.v1.GenerateResponse"]["fields"].keys()
    assert {"finish_reason", "output_token_logprobs"} <= CLASSES["api.v1.GenerateMetaInfo"]["fields"].keys()
    assert ALIASES["LogprobEntries"] == "List[LogprobEntry]"


def test_parse_generate_response_exact() -> None:
    body = [_item([7, 8, 2], {"type": "stop", "matched": 2}), _item([5], {"type": "length", "length": 1}, text=None)]
    c = P.parse_generate_response(body, 2)
    assert c == [Completion([7, 8, 2], "t", [-0.5, -1.0, -1.5], "stop"), Completion([5], "", [-0.5], "length")]
    no_ids = _item([3, 4], {"type": "length"})
    del no_ids["output_ids"]
    assert P.parse_generate_response([no_ids], 1)[0].token_ids == [3, 4]
    none_lp = _item([3], {"type": "stop"})
    none_lp["meta_info"]["output_token_logprobs"][0][0] = None
    assert P.parse_generate_response(none_lp, 1)[0].logprobs is None  # single-request form, no logprobs


def test_parse_generate_response_rejections() -> None:
    with pytest.raises(P.SGLangAbortedError, match=r"/generate\[1\]: request aborted"):
        P.parse_generate_response([_item([1], {"type": "stop"}), _item([], {"type": "abort", "message": "paused"})], 2)
    with pytest.raises(P.SGLangResponseError, match=r"1 results for 2 requests"):
        P.parse_generate_response([_item([1], {"type": "stop"})], 2)
    bad = _item([1, 2], {"type": "stop"})
    bad["output_ids"] = [1, 3]
    with pytest.raises(P.SGLangResponseError, match="token ids differ from output_ids"):
        P.parse_generate_response([bad], 1)
    missing = _item([1], {"type": "stop"})
    del missing["meta_info"]["output_token_logprobs"]
    with pytest.raises(P.SGLangResponseError, match="output_token_logprobs: missing"):
        P.parse_generate_response([missing], 1)
    with pytest.raises(P.SGLangResponseError, match="expected a list of 1 results"):
        P.parse_generate_response({"error": "boom"}, 1)
