"""Regenerate tests/unit/sglang_io_struct_fields.json from an unpacked SGLang wheel.

    pip download sglang==<version> --no-deps -d /tmp/sgl && cd /tmp/sgl && unzip -q sglang-*.whl
    python tests/contracts/extract_sglang_fields.py /tmp/sgl <version> > tests/unit/sglang_io_struct_fields.json

Reads the request/response classes with `ast` (SGLang is not importable without CUDA), so the
field specs are the annotation *strings* of the source: names, required-ness and defaults.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

# (key in the json, file under the package root, class name, base classes whose fields it inherits)
CLASSES: list[tuple[str, str, str, list[str]]] = [
    ("GenerateReqInput", "sglang/srt/managers/io_struct.py", "GenerateReqInput", []),
    ("InitWeightsUpdateGroupReqInput", "sglang/srt/managers/io_struct.py", "InitWeightsUpdateGroupReqInput", ["BaseReq"]),
    ("DestroyWeightsUpdateGroupReqInput", "sglang/srt/managers/io_struct.py", "DestroyWeightsUpdateGroupReqInput", ["BaseReq"]),
    ("UpdateWeightsFromDistributedReqInput", "sglang/srt/managers/io_struct.py", "UpdateWeightsFromDistributedReqInput", ["BaseReq"]),
    ("UpdateWeightsFromTensorReqInput", "sglang/srt/managers/io_struct.py", "UpdateWeightsFromTensorReqInput", ["BaseReq"]),
    ("PauseGenerationReqInput", "sglang/srt/managers/io_struct.py", "PauseGenerationReqInput", ["BaseReq"]),
    ("ContinueGenerationReqInput", "sglang/srt/managers/io_struct.py", "ContinueGenerationReqInput", ["BaseReq"]),
    ("FlushCacheReqInput", "sglang/srt/managers/io_struct.py", "FlushCacheReqInput", ["BaseReq"]),
    ("SamplingParams", "sglang/srt/sampling/sampling_params.py", "SamplingParams", []),
    ("api.v1.GenerateRequest", "sglang/api/v1/api_types.py", "GenerateRequest", []),
    ("api.v1.SamplingParams", "sglang/api/v1/api_types.py", "SamplingParams", []),
    ("api.v1.GenerateResponse", "sglang/api/v1/api_types.py", "GenerateResponse", []),
    ("api.v1.GenerateMetaInfo", "sglang/api/v1/api_types.py", "GenerateMetaInfo", []),
]
ALIAS_FILES = ["sglang/srt/managers/io_struct.py", "sglang/api/v1/api_types.py",
               "sglang/srt/managers/schedule_batch.py"]


def _class_fields(tree: ast.Module, name: str) -> tuple[dict[str, Any], str]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields: dict[str, Any] = {}
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    ann = ast.unparse(st.annotation)
                    if ann.startswith("ClassVar"):
                        continue
                    fields[st.target.id] = {
                        "annotation": ann,
                        "required": st.value is None,
                        "default": None if st.value is None else ast.unparse(st.value),
                    }
            return fields, ast.get_docstring(node) or ""
    raise KeyError(f"class {name} not found")


def _aliases(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel in ALIAS_FILES:
        tree = ast.parse((root / rel).read_text())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name) and node.targets[0].id[:1].isupper()
                    and isinstance(node.value, (ast.Subscript, ast.Name, ast.BinOp))):
                out.setdefault(node.targets[0].id, ast.unparse(node.value))
    return out


def main(root: Path, version: str) -> dict[str, Any]:
    classes: dict[str, Any] = {}
    for key, rel, cls, bases in CLASSES:
        tree = ast.parse((root / rel).read_text())
        fields: dict[str, Any] = {}
        for base in bases:
            fields.update(_class_fields(tree, base)[0])
        own, doc = _class_fields(tree, cls)
        fields.update(own)
        entry: dict[str, Any] = {"file": rel, "fields": fields}
        if "unknown keys rejected" in doc:
            entry["unknown_keys"] = "rejected"
        elif "unknown keys ignored" in doc:
            entry["unknown_keys"] = "ignored"
        classes[key] = entry
    return {
        "_note": (f"Field specs of SGLang's HTTP request classes, extracted with "
                  f"tests/contracts/extract_sglang_fields.py from the sglang=={version} wheel "
                  f"(PyPI, cp311 manylinux). 'api.v1.*' come from sglang/api/v1/api_types.py, the "
                  f"JSON contract /generate checks bodies against (api.v1.SamplingParams rejects "
                  f"unknown keys). Annotations are source strings; 'aliases' resolves type names."),
        "sglang_version": version,
        "classes": classes,
        "aliases": _aliases(root),
    }


if __name__ == "__main__":
    json.dump(main(Path(sys.argv[1]), sys.argv[2]), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
