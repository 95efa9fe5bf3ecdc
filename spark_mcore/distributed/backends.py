"""What the installation offers megatron-core: said once (`spark-mcore doctor`, the run
directory's backends.txt) instead of megatron's import-time warnings on every command."""

from __future__ import annotations

import importlib.util
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def backend_facts() -> dict[str, str]:
    """Package versions and which optional fused backends are importable (no heavy imports)."""
    import torch

    te = importlib.util.find_spec("transformer_engine") is not None
    apex = importlib.util.find_spec("apex") is not None and importlib.util.find_spec("apex.normalization") is not None
    return {
        "torch": torch.__version__,
        "megatron-core": _version("megatron-core") or "not installed",
        "cuda": f"available ({torch.cuda.device_count()} devices)" if torch.cuda.is_available() else "not available",
        "transformer-engine": (_version("transformer-engine") or "installed") if te else
        "not installed: megatron-core uses its local (torch) layers; FP8 is unavailable",
        "apex": "installed" if apex else "not installed: megatron-core uses torch norms and optimizers",
    }


def describe_backends() -> str:
    return "\n".join(f"{k}: {v}" for k, v in backend_facts().items())
