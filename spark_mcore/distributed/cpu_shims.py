"""megatron-core on CPU (gloo): compatibility shims for the places that assume CUDA.

`apply_cpu_shims()` installs them only when `torch.cuda.is_available()` is False; on a GPU it
does nothing. It is idempotent (a second call is a no-op) and defensive across megatron-core
versions (0.16.1 on Python 3.11, 0.19.x on Python 3.12): every module and attribute is looked
up with `importlib` / `hasattr`, and a symbol that moved is skipped, never an import error.

The shims (numbered as in /work/shared/PLATFORM.md, "megatron-core on CPU (gloo)"):

1. `megatron.core.utils.GlobalMemoryBuffer.get_tensor` allocates its buffer on
   `torch.cuda.current_device()` (the local attention uses it): the module sees a CPU torch.
   The same pattern (`device=torch.cuda.current_device()`) sits in the forward/backward path
   of the local-spec GPTModel: RotaryEmbedding.get_emb (moves inv_freq to the GPU),
   DotProductAttention / Attention / TransformerLayer buffers, the default causal mask
   (transformer.utils.get_default_causal_mask, `device="cuda"`), tensor_parallel.mappings
   all-gathers (TP, `parallel_output=False`) and tensor_parallel.layers; those modules see a
   CPU torch too.
2. `megatron.core.tensor_parallel.random.CudaRNGStatesTracker` (used by
   `model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()` around attention
   dropout, and activation recompute) stores `torch.cuda.get_rng_state()` states: replaced by
   `CpuRNGStatesTracker`, which forks the default CPU generator instead; `_get_cuda_rng_state`
   / `_set_cuda_rng_state` read and write the CPU generator.
3. `megatron.core.pipeline_parallel.{schedules,p2p_communication}` create tensors with
   `device="cuda"` / `torch.cuda.current_device()` and call `torch.cuda.synchronize()`: they
   see a CPU torch.
4. `megatron.core.dist_checkpointing.save` needs psutil (undeclared dependency; without it the
   writer process dies and save hangs) and an existing target directory:
   `check_dist_checkpointing_ready(path)` checks the first and creates the second. Scripts
   that save must also keep an `if __name__ == "__main__":` guard (spawn-context manager).
5. `megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32` asserts
   `param.grad.type() == 'torch.cuda.FloatTensor'`: replaced by a float32-on-any-device
   version; `get_grad_norm_fp32`, `count_zeros_fp32` and the optimizers' `device='cuda'`
   scalars see a CPU torch.
6. megatron-core 0.19.x: DDP `start_grad_sync` calls `torch.cuda.current_stream()` (and the
   DDP constructor may build a `torch.cuda.Stream`): the DDP modules see a CPU torch.
7. (found here, not in PLATFORM.md) `LanguageModule.setup_embeddings_and_output_layer` runs
   `weight.data = weight.data.cuda()` before all-reducing a tied embedding between the first
   and last pipeline stages (PP > 1 with tied embeddings): it is wrapped so that, during that
   call only, `Tensor.cuda()` returns the tensor itself.

"A CPU torch" is `_CpuTorch`, a module proxy put in place of the `torch` global of only those
megatron modules: `torch.cuda.current_device()` is `cpu`, synchronize/streams/events are
no-ops, and tensor factories map `device="cuda"` to CPU. Everything else is the real torch, so
other libraries (transformers, our own code) are unaffected.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_APPLIED = False

# Modules whose `torch` global is replaced by the CPU proxy, with the shim number they serve.
_PROXIED_MODULES: dict[str, int] = {
    "megatron.core.utils": 1,
    "megatron.core.models.gpt.gpt_model": 1,
    "megatron.core.models.common.embeddings.rotary_pos_embedding": 1,
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": 1,
    "megatron.core.transformer.attention": 1,
    "megatron.core.transformer.dot_product_attention": 1,
    "megatron.core.transformer.transformer_layer": 1,
    "megatron.core.transformer.utils": 1,
    "megatron.core.tensor_parallel.layers": 1,
    "megatron.core.tensor_parallel.mappings": 1,
    "megatron.core.tensor_parallel.data": 1,
    "megatron.core.pipeline_parallel.schedules": 3,
    "megatron.core.pipeline_parallel.p2p_communication": 3,
    "megatron.core.optimizer.clip_grads": 5,
    "megatron.core.optimizer.optimizer": 5,
    "megatron.core.distributed.distributed_data_parallel": 6,
    "megatron.core.distributed.param_and_grad_buffer": 6,
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": 4,
    "megatron.core.dist_checkpointing.strategies.torch": 4,
    "megatron.core.dist_checkpointing.strategies.filesystem_async": 4,
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": 4,
    "megatron.core.dist_checkpointing.strategies.fully_parallel": 4,
    "megatron.core.dist_checkpointing.strategies.async_utils": 4,
    "megatron.core.dist_checkpointing.exchange_utils": 4,
}

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor",
)


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec ("cuda", "cuda:0", torch.device("cuda"), int index) to CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen by proxied megatron modules on a CPU-only host."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _NoOpStream:
        return _NoOpStream()

    default_stream = current_stream
    Stream = _NoOpStream
    Event = _NoOpStream

    @staticmethod
    def stream(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class _CpuTorch(types.ModuleType):
    """The real `torch` except `torch.cuda` (see `_CpuCuda`) and CUDA-device tensor factories."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            if hasattr(torch, name):
                setattr(self, name, self._wrap_factory(getattr(torch, name)))

    @staticmethod
    def _wrap_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        factory.__name__ = getattr(fn, "__name__", "factory")
        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Mixin body for the CPU RNG tracker (shim 2); see `_make_cpu_tracker_class`.

    Named states are CPU generator states (`torch.get_rng_state()` byte tensors). `fork(name)`
    swaps the default CPU generator to the named state for the `with` block, saves the
    advanced state back under `name`, and restores the previous state, so random ops inside
    a fork (dropout in tensor-parallel regions) draw from the tracked stream.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _make_cpu_tracker_class(base: type) -> type:
    """Subclass megatron's tracker so isinstance checks (`get_all_rng_states`) still hold."""
    attrs = {"add": CpuRNGStatesTracker.add, "fork": CpuRNGStatesTracker.fork,
             "__doc__": CpuRNGStatesTracker.__doc__, "_spark_cpu_shim": True}
    return type("CpuRNGStatesTracker", (base,), attrs)


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Replaces random._get_cuda_rng_state(device, clone, graph_safe): CPU generator state."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    """Replaces random._set_cuda_rng_state(new_state, device, graph_safe)."""
    torch.set_rng_state(new_state)


def _shim_rng() -> None:
    """Shim 2: CPU RNG tracker for megatron.core.tensor_parallel.random."""
    rnd = _import("megatron.core.tensor_parallel.random")
    if rnd is None or not hasattr(rnd, "CudaRNGStatesTracker"):
        log.warning("cpu_shims: tensor_parallel.random.CudaRNGStatesTracker not found; skipped")
        return
    base = rnd.CudaRNGStatesTracker
    if not getattr(base, "_spark_cpu_shim", False):
        # initialize_rng_tracker instantiates the module-global name at call time.
        rnd.CudaRNGStatesTracker = _make_cpu_tracker_class(base)
    for name, fn in (("_get_cuda_rng_state", _cpu_get_rng_state),
                     ("_set_cuda_rng_state", _cpu_set_rng_state)):
        if hasattr(rnd, name):
            setattr(rnd, name, fn)
    # A tracker built before the shim is a CUDA one: drop it so the next call builds ours.
    tracker = getattr(rnd, "_CUDA_RNG_STATE_TRACKER", None)
    if tracker is not None and not getattr(type(tracker), "_spark_cpu_shim", False):
        rnd._CUDA_RNG_STATE_TRACKER = None
        rnd._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def clip_grad_by_total_norm_fp32_cpu(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Shim 5: replaces optimizer.clip_grads.clip_grad_by_total_norm_fp32.

    Scales every float32 grad in place by max_norm / (total_norm + 1e-6) when that is < 1,
    like the original, without asserting the `torch.cuda.FloatTensor` type.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        if g.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"grad clipping expects float32/bfloat16 grads, got {g.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            local = g._local_tensor if hasattr(g, "_local_tensor") else g
            local.detach().mul_(clip_coeff)


def _shim_clip_grads() -> None:
    """Shim 5: swap clip_grad_by_total_norm_fp32 where it is defined and where imported."""
    for mod_name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer",
                     "megatron.core.optimizer.distrib_optimizer"):
        mod = _import(mod_name)
        if mod is not None and hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32_cpu


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    """Within the block, `Tensor.cuda()` returns the tensor itself (CPU-only host)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _shim_tied_embedding_setup() -> None:
    """Shim 7: wrap LanguageModule.setup_embeddings_and_output_layer (tied embeddings, PP>1)."""
    mod = _import("megatron.core.models.common.language_module.language_module")
    cls = getattr(mod, "LanguageModule", None)
    original = getattr(cls, "setup_embeddings_and_output_layer", None)
    if original is None or getattr(original, "_spark_cpu_shim", False):
        return

    def setup_embeddings_and_output_layer(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    setup_embeddings_and_output_layer._spark_cpu_shim = True  # type: ignore[attr-defined]
    setup_embeddings_and_output_layer.__doc__ = original.__doc__
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer  # type: ignore[union-attr]


def _shim_proxies() -> None:
    """Shims 1, 3, 5, 6: the listed megatron modules see `_CpuTorch` as `torch`."""
    proxy = _CpuTorch()
    for mod_name in _PROXIED_MODULES:
        mod = _import(mod_name)
        if mod is None or not hasattr(mod, "torch"):
            continue
        if not isinstance(mod.torch, _CpuTorch):
            mod.torch = proxy


def check_dist_checkpointing_ready(path: str | Path) -> Path:
    """Shim 4: make `dist_checkpointing.save` safe to call on `path`.

    Creates the directory and checks psutil is importable (megatron's checkpoint writer needs
    it but does not declare it; without it save() hangs). Returns the directory.
    """
    try:
        importlib.import_module("psutil")
    except ImportError as e:
        raise RuntimeError(
            "megatron dist_checkpointing needs psutil: run `pip install psutil`"
        ) from e
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _import(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as e:  # a module moved in another megatron-core version
        log.debug("cpu_shims: %s not importable (%s); skipped", name, e)
        return None


def cpu_shims_applied() -> bool:
    """True once `apply_cpu_shims` has installed the shims in this process."""
    return _APPLIED


def apply_cpu_shims(force: bool = False) -> bool:
    """Install the CPU shims when CUDA is absent (or `force`); returns whether they are active.

    Idempotent. Call before building models or running schedules; `init_distributed` does.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _shim_proxies()
    _shim_rng()
    _shim_clip_grads()
    _shim_tied_embedding_setup()
    _APPLIED = True
    return True
