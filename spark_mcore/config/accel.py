"""What this machine can accelerate with: CUDA, Transformer Engine, apex's fused kernels.

A leaf (stdlib; torch imported only inside the functions that ask CUDA) so that configs can
check at load time that a feature they ask for can run, and name what to install when it
cannot, while a config that asks for none of them loads without importing torch. Results are
cached per process; `clear_cache()` resets them (tests monkeypatch `_import`).
"""

from __future__ import annotations

import functools
import importlib

INSTALL = {
    "transformer_engine": "Transformer Engine: use the trainer image (docker/Dockerfile.trainer, NGC PyTorch ships "
                          "it) or `pip install --no-build-isolation transformer-engine[pytorch]` on a CUDA machine",
    "apex": "NVIDIA apex built with --cpp_ext --cuda_ext (ships in NGC PyTorch images; not on PyPI)",
    "cuda": "a CUDA build of torch on a machine with an NVIDIA GPU",
}
# the fused softmax kernels megatron's FusedScaleMaskSoftmax imports (megatron.core.fusions.fused_softmax)
FUSED_SOFTMAX_MODULES = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                         "scaled_softmax_cuda")


def _import(name: str) -> object:
    return importlib.import_module(name)


@functools.cache
def probe(name: str) -> tuple[bool, str]:
    """(importable, version or the import error). Any exception counts: TE's import raises
    OSError without libcuda, a kernel built for another torch raises ImportError."""
    try:
        mod = _import(name)
    except Exception as e:  # noqa: BLE001 - the reason is what the user needs
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, str(getattr(mod, "__version__", "installed"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def te_available() -> bool:
    """Transformer Engine's PyTorch layers import (which also needs a CUDA driver)."""
    return probe("transformer_engine.pytorch")[0]


def fused_softmax_available() -> bool:
    """megatron's masked_softmax_fusion needs CUDA and all of apex's softmax kernels."""
    return cuda_available() and all(probe(m)[0] for m in FUSED_SOFTMAX_MODULES)


def fp8_capable_gpu() -> bool:
    """FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if not cuda_available():
        return False
    import torch

    return torch.cuda.get_device_capability(0) >= (8, 9)


def clear_cache() -> None:
    probe.cache_clear()
