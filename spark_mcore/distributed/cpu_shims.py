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
8. (found here, not in PLATFORM.md) `optimizer.distrib_optimizer.DistributedOptimizer`
   (`parallel.use_distributed_optimizer`): its constructor accepts only parameters whose
   `param.type()` is 'torch.cuda.FloatTensor' / Half / BFloat16 (TypeError otherwise), so it
   runs with CPU tensors reading as those names; its buffers (`torch.cuda.current_device()`)
   see a CPU torch; the "fully_reshardable" checkpoint gather calls `.cuda()` on each shard
   (identity during that call). With torch's Adam (megatron's fallback without TE / apex,
   so always on CPU) three checkpoint bugs are wrapped: `state_dict` and the save fail
   before the first step, the load raises KeyError('step'), and the load gives all parameters one
   shared step tensor that Adam then advances once per parameter per step.
   gloo needs nothing: it implements reduce_scatter_tensor / all_gather_into_tensor, also
   under `_coalescing_manager` (added in torch 2.2 / 2.3; run here on 2.13 and 2.15), the
   reduce-scatter as an all-reduce plus a slice (correct, twice the traffic of NCCL's).
9. (found here, not in PLATFORM.md) context parallelism: `rope_utils.get_pos_emb_on_this_cp_rank`
   (also imported by name into `rotary_pos_embedding`) builds its chunk index with
   `pin_memory=True` and `.cuda()`: replaced by the same index_select on the embedding's device.

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
    "megatron.core.optimizer.distrib_optimizer": 8,
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


def _patch_method(module: str, cls_name: str, method: str,
                  make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace `module.cls_name.method` by `make(original)`; skipped (with a warning) when the
    class or method moved. The replacement keeps the original's name and docstring and is
    marked, so a second call does nothing."""
    cls = getattr(_import(module), cls_name, None)
    original = getattr(cls, method, None)
    if original is None:
        log.warning("cpu_shims: %s.%s.%s not found; skipped", module, cls_name, method)
        return
    if getattr(original, "_spark_cpu_shim", False):
        return
    wrapper = make(original)
    wrapper._spark_cpu_shim = True  # type: ignore[attr-defined]
    wrapper.__doc__ = original.__doc__
    wrapper.__name__ = original.__name__
    setattr(cls, method, wrapper)


def _wrap_method(module: str, cls_name: str, method: str,
                 context: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
    """Run `module.cls_name.method` inside `context()` (see `_patch_method`)."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            with context():
                return original(self, *args, **kwargs)

        return wrapper

    _patch_method(module, cls_name, method, make)


# What `Tensor.type()` returns for a CUDA tensor of each dtype megatron's optimizers accept.
_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


@contextlib.contextmanager
def _cpu_tensor_type_reads_as_cuda() -> Iterator[None]:
    """Within the block, `Tensor.type()` (no arguments) names a CPU float tensor as its CUDA type.

    megatron classifies parameters by comparing that string with 'torch.cuda.FloatTensor' etc.;
    a conversion call (`t.type(torch.float16)`) and other devices and dtypes are unchanged."""
    original = torch.Tensor.type

    def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, *args, **kwargs)

    torch.Tensor.type = type_name  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _state_dict_with_initial_adam_state(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap DistributedOptimizer.state_dict for torch's Adam (megatron's fallback without TE /
    apex, i.e. always on CPU).

    torch's Adam creates its per-parameter state (step 0, zero moments) at its first step, and
    megatron reads the step from that state, asserting exactly one value, and the checkpoint
    gather reads the moments: an optimizer that never stepped (a run saving before its first
    update, or the fresh one a resumed run loads into) fails both. The wrapper gives such an
    optimizer the state its first step would create, which changes nothing Adam computes."""

    def state_dict(self: Any) -> Any:
        inner = self.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and len(inner.state) == 0:
            for group in inner.param_groups:
                for param in group["params"]:
                    state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                             "exp_avg_sq": torch.zeros_like(param)}
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(param)
                    inner.state[param] = state
        return original(self)

    return state_dict


def _set_states_keeping_step(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap DistributedOptimizer._set_main_param_and_optimizer_states for torch's Adam.

    torch's Adam keeps a per-parameter "step" tensor in its state. The "fully_reshardable"
    checkpoint load restores that step from the param groups and leaves it out of the tensors it
    passes here, but this method copies every state key into place and fails with
    KeyError('step'). The wrapper passes the step already in place (a copy onto itself)."""

    def set_states(self: Any, model_param: torch.Tensor, tensors: dict[str, Any]) -> Any:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if "step" not in tensors and isinstance(step, torch.Tensor):
            tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    return set_states


def _load_state_dict_unsharing_steps(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap DistributedOptimizer.load_state_dict for torch's Adam.

    megatron gives every parameter's state the same "step" tensor object, and torch's Adam
    increments each parameter's step in place: after a load, one optimizer step advanced the
    shared step once per parameter, so Adam's bias correction went wrong from the first step
    after a resume. The wrapper gives each parameter its own copy."""

    def load_state_dict(self: Any, state_dict: Any) -> Any:
        result = original(self, state_dict)
        inner = self.optimizer
        if isinstance(inner, torch.optim.Optimizer):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        return result

    return load_state_dict


def _shim_distributed_optimizer() -> None:
    """Shim 8: megatron's DistributedOptimizer on CPU (its gloo reduce-scatter / all-gather need
    nothing: gloo implements both, as an all-reduce plus a slice for the reduce-scatter).

    - `__init__` sorts parameters into fp32 / fp16 groups by `param.type() ==
      'torch.cuda.FloatTensor'` and raises TypeError otherwise: it runs with CPU tensors
      reading as their CUDA types. Its `torch.cuda.current_device()` buffers see the CPU torch.
    - The checkpoint gather of the "fully_reshardable" format (`get_parameter_state_dp_zero`)
      moves each DP shard to the GPU with `.cuda()` before an all-gather: gloo gathers CPU ones.
    - torch's Adam (the only one on CPU) breaks checkpoints before the first step, and the
      checkpoint load (`_set_main_param_and_optimizer_states`, `load_state_dict`): see the
      three wrappers."""
    mod = "megatron.core.optimizer.distrib_optimizer"
    _wrap_method(mod, "DistributedOptimizer", "__init__", _cpu_tensor_type_reads_as_cuda)
    _wrap_method(mod, "DistributedOptimizer", "get_parameter_state_dp_zero", _tensor_cuda_is_identity)
    if getattr(_import(mod), "HAVE_APEX_OR_TE", True):
        return  # TE / apex fused Adam keeps its step in the param groups
    _patch_method(mod, "DistributedOptimizer", "state_dict", _state_dict_with_initial_adam_state)
    _patch_method(mod, "DistributedOptimizer", "_set_main_param_and_optimizer_states",
                  _set_states_keeping_step)
    _patch_method(mod, "DistributedOptimizer", "load_state_dict", _load_state_dict_unsharing_steps)


def _shim_tied_embedding_setup() -> None:
    """Shim 7: wrap LanguageModule.setup_embeddings_and_output_layer (tied embeddings, PP>1)."""
    _wrap_method("megatron.core.models.common.language_module.language_module", "LanguageModule",
                 "setup_embeddings_and_output_layer", _tensor_cuda_is_identity)


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


def pos_emb_on_this_cp_rank_cpu(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    """Shim 9: megatron's get_pos_emb_on_this_cp_rank on the embedding's device: this CP rank's
    chunks r and 2C-1-r of the 2C chunks along `seq_dim`."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    chunks = pos_emb.view(*shape[:seq_dim], 2 * size, -1, *shape[seq_dim + 1:]).index_select(seq_dim, index)
    return chunks.view(*shape[:seq_dim], -1, *shape[seq_dim + 1:])


def _shim_cp_rope() -> None:
    """Shim 9: swap get_pos_emb_on_this_cp_rank where it is defined and where imported."""
    for mod_name in ("megatron.core.models.common.embeddings.rope_utils",
                     "megatron.core.models.common.embeddings.rotary_pos_embedding"):
        mod = _import(mod_name)
        if mod is not None and hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            mod.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank_cpu


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
    _shim_distributed_optimizer()
    _shim_cp_rope()
    _APPLIED = True
    return True
