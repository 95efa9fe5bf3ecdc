"""Hugging Face <-> Megatron dist-checkpoint conversion (Qwen2 / Qwen2.5 dense text models).

Layout written by `convert_hf_to_mcore` (the trainer's checkpoint layout, see checkpoint/io.py):

    <out>/checkpoints/step_<N>/model/      megatron `dist_checkpointing` (torch_dist) of
                                           `GPTModel.sharded_state_dict(prefix="")`
    <out>/checkpoints/step_<N>/meta.json   step, policy_version, tp, pp, family, vocab_size,
                                           dtype, "model" (ModelConfig as JSON) and
                                           "hf_config" (the source config.json)
    <out>/checkpoints/step_<N>/ref         -> model (symlink: the KL reference of a converted
                                           model is the model itself; the trainer loads it)
    <out>/checkpoints/step_<N>/hf/         the source's small files (config, tokenizer, ...)

The step directory is written as `.tmp-step_<N>` and renamed when complete. A dist checkpoint
holds global tensors, so it loads under any TP/PP; tp/pp in meta.json record how it was made.
`convert_mcore_to_hf` reads such a directory (or a trainer run directory: its newest
checkpoint) whatever TP/PP wrote it, and writes safetensors shards + index + config.json.

Peak memory (S = model size in the target dtype, L = one decoder layer, E = embedding):
- HF -> Megatron runs tp*pp processes (gloo, CPU) when tp*pp > 1. Rank r builds only its own
  pipeline stage with its own tensor-parallel shard (uninitialised, ~S/(tp*pp)), then fills it
  one group at a time (the non-layer tensors, then each of its layers): it reads from the
  memory-mapped safetensors only the HF tensors that group comes from, converts them to full
  megatron tensors and cuts its TP shard (~3L transient: read copy, fused qkv / fc1 copy,
  shard copy), then drops them. First / last stages also hold the full embedding / lm_head
  transiently (~3E). All ranks of a TP group read the same full layer, so the host peak is
  about S + tp*pp*3L (+ 3E per stage end), never 2S. megatron's checkpoint writer forks
  writer processes that share the tensors copy-on-write. The safetensors pages are mapped
  files (page cache, reclaimable), not process memory.
- Megatron -> HF runs in one process: it builds the model on the `meta` device (no memory)
  only to learn the checkpoint keys, then reads one group at a time from the dist checkpoint
  (torch.distributed.checkpoint with a slice-reading planner), converts it and hands it to a
  writer that flushes safetensors shards of at most `max_shard_bytes` (2 GB by default).
  Peak is about one shard + ~2 groups (the largest group is the non-layer one: embedding +
  lm_head + final norm); never the whole model.
Measured (tp = pp = 1, fp32, 8 layers of hidden 1024 / ffn 4096, vocab 32000 untied: S = 714
MiB, L = 60 MiB, E = 125 MiB; anonymous memory above the ~290 MiB after imports): HF ->
Megatron +1006 MiB (= S + 292), Megatron -> HF with 100 MiB shards +374 MiB.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spark_mcore.checkpoint.config import STEP_PREFIX
from spark_mcore.checkpoint.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    ConversionError,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    aux_files,
    copy_files,
    read_json,
    require_dir,
)
from spark_mcore.config.loader import from_dict, to_dict
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.models.registry import ModelAdapter, get_adapter

__all__ = ["ConversionError", "SUPPORTED_HF_MODELS", "HFModelKind", "HFToMcoreJob", "check_layout",
           "convert_hf_to_mcore", "convert_mcore_to_hf", "fill_model_from_hf", "finish_hf_to_mcore",
           "plan_hf_to_mcore", "resolve_step_dir", "run_hf_to_mcore_jobs", "run_hf_to_mcore_rank"]

AUX_DIRNAME = "hf"
# checkpoint/io.py loads the KL reference model from <step>/ref when algo.kl_coef > 0; for a
# converted model the reference is the model itself, so `ref` is a symlink to `model`.
REFERENCE_DIRNAME = "ref"
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_TO_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}
_STORED_TO_DTYPE: dict[torch.dtype | None, str] = {v: k for k, v in _TORCH_DTYPES.items()}
_EMBEDDING, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
_DEFAULT_TIMEOUT_S = 24 * 3600.0


@dataclass(frozen=True)
class HFModelKind:
    """An HF `model_type` the converter reads: the adapter family and accepted architectures."""

    family: str
    architectures: tuple[str, ...]
    description: str


# HF config.json `model_type` -> what converts it. Adding a family = one entry + its adapter.
SUPPORTED_HF_MODELS: dict[str, HFModelKind] = {
    "qwen2": HFModelKind("qwen2", ("Qwen2ForCausalLM",), "Qwen2 / Qwen2.5 dense text models"),
    "qwen2_5_vl": HFModelKind("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",),
                              "Qwen2.5-VL vision-language models (vision tower included)"),
}


def _supported_text() -> str:
    return "; ".join(f"model_type {t!r} with architectures {list(k.architectures)} ({k.description})"
                     for t, k in SUPPORTED_HF_MODELS.items())


def resolve_hf_family(raw: dict[str, Any], where: Path) -> str:
    """The adapter family for a config.json dict; ConversionError naming what is supported."""
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    kind = SUPPORTED_HF_MODELS.get(str(model_type))
    if kind is None or (archs and not set(archs) & set(kind.architectures)):
        raise ConversionError(
            f"{where}: model_type={model_type!r}, architectures={archs} is not supported by the "
            f"converter; supported: {_supported_text()}")
    return kind.family


# ---- layout checks --------------------------------------------------------------------------

def _divisors(n: int, limit: int = 128) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def check_layout(cfg: ModelConfig, vocab_size: int, tp: int, pp: int) -> None:
    """ConversionError when the model cannot be split into tp x pp, with valid alternatives."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"tp={tp} and pp={pp} must be >= 1")
    valid_tp = _divisors(math.gcd(cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size))
    tp_fields = (("num_attention_heads", cfg.num_attention_heads),
                 ("num_key_value_heads (query groups)", cfg.num_query_groups),
                 ("intermediate_size", cfg.ffn_hidden_size))
    for field, value in tp_fields:
        if value % tp:
            raise ConversionError(
                f"{field}={value} is not divisible by tp={tp}: megatron splits whole heads / "
                f"groups across tensor-parallel ranks; use tp in {valid_tp}")
    if vocab_size % tp:
        padded = -(-vocab_size // tp) * tp
        raise ConversionError(
            f"vocab_size={vocab_size} is not divisible by tp={tp}; use tp in "
            f"{[d for d in valid_tp if vocab_size % d == 0]}, or pad the vocabulary to {padded} "
            f"(`model.resize_token_embeddings({padded})` in transformers, then save_pretrained)")
    if cfg.num_layers % pp:
        raise ConversionError(f"num_hidden_layers={cfg.num_layers} is not divisible by pp={pp}; "
                              f"use pp in {_divisors(cfg.num_layers)}")


# ---- HF -> Megatron -------------------------------------------------------------------------

@dataclass(frozen=True)
class HFToMcoreJob:
    """A planned HF -> Megatron conversion (picklable: it crosses the spawn boundary).

    `step_dir` is the temporary directory the ranks write into; `final_dir` where
    `finish_hf_to_mcore` moves it.
    """

    hf_dir: str
    step_dir: str
    final_dir: str
    step: int
    family: str
    model_cfg: ModelConfig
    vocab_size: int
    tp: int
    pp: int
    hf_config: dict[str, Any]
    progress: bool = True


def inspect_hf(hf_dir: Path, dtype: str | None) -> tuple[str, ModelConfig, dict[str, Any]]:
    """(family, ModelConfig with vocab_size, raw config.json) after validating the directory."""
    from transformers import AutoConfig

    raw = read_json(hf_dir / "config.json", "Hugging Face config")
    family = resolve_hf_family(raw, hf_dir / "config.json")
    if dtype is None:
        dtype = _HF_TO_DTYPE.get(str(raw.get("dtype") or raw.get("torch_dtype")), "fp32")
    if dtype not in _TORCH_DTYPES:
        raise ConversionError(f"dtype={dtype!r} must be one of {sorted(_TORCH_DTYPES)}")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    except Exception as e:  # transformers raises many types for a bad config
        raise ConversionError(f"{hf_dir / 'config.json'} cannot be loaded by transformers ({e})") from e
    cfg = get_adapter(family).model_config_from_hf(hf_cfg, dtype)  # type: ignore[call-arg]
    vocab = getattr(hf_cfg, "vocab_size", None) or cfg.vocab_size  # VL configs: text_config's
    cfg = dataclasses.replace(cfg, vocab_size=int(vocab), hf_path=None)
    return family, cfg, raw


def _check_hf_tensors(reader: SafetensorsReader, adapter: ModelAdapter) -> None:
    """Map the whole checkpoint on `meta` tensors: missing / unknown tensors fail here, before
    any process starts or any data is read."""
    try:
        adapter.hf_to_mcore(reader.meta_state())
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{reader.hf_dir}: the weights do not match the config ({e})") from e


def plan_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                     dtype: str | None = None, step: int = 0, overwrite: bool = False,
                     progress: bool = True) -> HFToMcoreJob:
    """Validate the input and the layout (no tensor data is read) and create the temporary
    step directory. dtype: "fp32" | "bf16" | "fp16"; None keeps the config's dtype."""
    hf = require_dir(hf_dir, "Hugging Face checkpoint")
    family, cfg, raw = inspect_hf(hf, dtype)
    check_layout(cfg, cfg.vocab_size, tp, pp)
    with SafetensorsReader(hf) as reader:
        _check_hf_tensors(reader, get_adapter(family, cfg))
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f".tmp-{STEP_PREFIX}{step}"
    if final.exists() and not overwrite:
        raise ConversionError(f"{final} already exists; pass overwrite=True (--overwrite) or "
                              "choose another output directory / step")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    return HFToMcoreJob(str(hf.resolve()), str(tmp), str(final), step, family, cfg,
                        cfg.vocab_size, tp, pp, raw, progress)


def run_hf_to_mcore_rank(job: HFToMcoreJob) -> None:
    """The work of one rank. Call it in every process of a world of tp*pp processes (the
    torchrun environment, or `run_hf_to_mcore_jobs`): builds this rank's stage / TP shard,
    fills it from HF and saves it with `dist_checkpointing.save` (collective)."""
    from megatron.core import dist_checkpointing

    from spark_mcore.distributed.config import ParallelConfig
    from spark_mcore.distributed.parallel import init_distributed

    pstate = init_distributed(ParallelConfig(tp=job.tp, pp=job.pp, backend="gloo"), seed=0)
    adapter = get_adapter(job.family, job.model_cfg)
    model = adapter.build_model(job.model_cfg, job.vocab_size, pre_process=pstate.is_first_stage,
                                post_process=pstate.is_last_stage, perform_initialization=False,
                                use_cpu_initialization=True)
    with SafetensorsReader(job.hf_dir) as reader:
        fill_model_from_hf(model, reader, adapter, pstate.tp_rank, pstate.tp_size,
                           progress=job.progress and pstate.rank == 0)
    dist_checkpointing.save(model.sharded_state_dict(prefix=""), str(Path(job.step_dir, "model")))
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _spawned_ranks(rank: int, jobs: tuple[HFToMcoreJob, ...]) -> None:
    for job in jobs:
        run_hf_to_mcore_rank(job)


def run_hf_to_mcore_jobs(jobs: list[HFToMcoreJob], in_process: bool | None = None,
                         timeout_s: float = _DEFAULT_TIMEOUT_S) -> None:
    """Run planned jobs (all with the same tp, pp) in one set of tp*pp processes.

    in_process: None runs in this process when tp*pp == 1 and torch.distributed is not
    initialised here; otherwise tp*pp CPU processes (gloo, free port) are spawned and always
    torn down. Several jobs share the processes, so start-up (importing megatron) is paid once.
    """
    if not jobs:
        return
    if len({(j.tp, j.pp) for j in jobs}) != 1:
        raise ValueError("run_hf_to_mcore_jobs: all jobs must have the same tp and pp")
    world = jobs[0].tp * jobs[0].pp
    if in_process is None:
        in_process = world == 1 and not torch.distributed.is_initialized()
    if in_process and world > 1:
        raise ConversionError(f"in_process=True needs tp*pp == 1, got tp*pp={world}")
    if in_process:
        from spark_mcore.distributed.parallel import destroy_distributed

        try:
            _spawned_ranks(0, tuple(jobs))
        finally:
            destroy_distributed()
        return
    from spark_mcore.distributed.launch import spawn_workers

    threads = max(1, (os.cpu_count() or 1) // world)
    spawn_workers(_spawned_ranks, world, args=(tuple(jobs),), timeout_s=timeout_s,
                  threads_per_worker=threads)


def finish_hf_to_mcore(job: HFToMcoreJob) -> Path:
    """Write meta.json and the HF side files, then rename the step directory into place."""
    tmp, final = Path(job.step_dir), Path(job.final_dir)
    meta = {"step": job.step, "policy_version": 0, "tp": job.tp, "pp": job.pp,
            "family": job.family, "vocab_size": job.vocab_size, "dtype": job.model_cfg.dtype,
            "model": to_dict(job.model_cfg), "hf_config": job.hf_config,
            "converted_from": job.hf_dir, "format_version": 1}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    copy_files(aux_files(Path(job.hf_dir)), tmp / AUX_DIRNAME)
    (tmp / REFERENCE_DIRNAME).symlink_to("model", target_is_directory=True)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                        dtype: str | None = None, step: int = 0, overwrite: bool = False,
                        progress: bool = True, in_process: bool | None = None,
                        timeout_s: float = _DEFAULT_TIMEOUT_S) -> Path:
    """HF safetensors directory -> `<out_dir>/checkpoints/step_<step>/` (see module docstring).

    dtype: "fp32" | "bf16" | "fp16"; None keeps the config's dtype (fp32 when it has none).
    Runs tp*pp processes when tp*pp > 1 (see `run_hf_to_mcore_jobs`). Returns the step dir.
    """
    job = plan_hf_to_mcore(hf_dir, out_dir, tp, pp, dtype, step, overwrite, progress)
    try:
        run_hf_to_mcore_jobs([job], in_process, timeout_s)
        return finish_hf_to_mcore(job)
    except BaseException:
        shutil.rmtree(job.step_dir, ignore_errors=True)
        raise


def _source_name(name: str, full_meta: dict[str, torch.Tensor], tied: bool) -> str:
    """The full megatron tensor a parameter is cut from (tied lm_head: the embedding)."""
    if name in full_meta:
        return name
    if tied and name == _OUTPUT and _EMBEDDING in full_meta:
        return _EMBEDDING
    raise ConversionError(f"megatron parameter {name!r} has no source tensor in the HF checkpoint")


@torch.no_grad()
def fill_model_from_hf(model: torch.nn.Module, reader: SafetensorsReader, adapter: ModelAdapter,
                       tp_rank: int = 0, tp_size: int = 1, progress: bool = False) -> None:
    """Copy HF weights into this rank's model shard, one decoder layer at a time.

    For each group of parameters (the non-layer ones, then each layer of this stage) only the
    HF tensors they come from are read; the adapter converts them on a state whose other
    entries are `meta` tensors (so it sees a complete checkpoint without its memory).
    """
    inner = mcore_tp.unwrap_model(model)
    tied = bool(getattr(inner, "share_embeddings_and_output_weights", False))
    offset = mcore_tp.layer_offset(inner)
    params = {mcore_tp.shift_layer_index(n, offset): p
              for n, p in mcore_tp.local_state(inner).items()}
    meta_hf = reader.meta_state()
    full_meta = adapter.hf_to_mcore(meta_hf)
    # The adapter names HF tensors in one spelling; the file may use another (qwen2_5_vl).
    canonical = getattr(adapter, "canonical_hf_name", None)
    stored = {canonical(n): n for n in meta_hf} if canonical is not None else {}
    groups: dict[int, list[str]] = {}
    for name in params:
        groups.setdefault(_group_index(name), []).append(name)
    for group in tqdm(sorted(groups), desc="HF -> megatron (layers)", disable=not progress):
        sources = {name: _source_name(name, full_meta, tied) for name in groups[group]}
        needed = {h for s in set(sources.values()) for h, _ in adapter.mcore_to_hf(s, full_meta[s])}
        state = dict(meta_hf)
        state.update({(n := stored.get(h, h)): reader.get(n) for h in sorted(needed)})
        full = adapter.hf_to_mcore(state)
        for name, src in sources.items():
            _copy_shard(adapter, name, full[src], params[name], tp_rank, tp_size)
        del state, full


def _group_index(name: str) -> int:
    """Decoder layer index; -1 for the non-layer parameters (processed first)."""
    layer = mcore_tp.layer_index(name)
    return -1 if layer is None else layer


def _copy_shard(adapter: ModelAdapter, name: str, full: torch.Tensor, param: torch.Tensor,
                tp_rank: int, tp_size: int) -> None:
    if full.is_meta:
        raise ConversionError(f"{name}: its HF source tensors were not read (adapter mapping bug)")
    shard = adapter.shard_for_tp(name, full, tp_rank, tp_size)
    if shard.shape != param.shape:
        raise ConversionError(f"{name}: HF gives shard {tuple(shard.shape)} but the model has "
                              f"{tuple(param.shape)} (tp_rank={tp_rank}/{tp_size}); the config "
                              "does not match the weights")
    param.copy_(shard.to(dtype=param.dtype, device=param.device))


# ---- Megatron -> HF -------------------------------------------------------------------------

def resolve_step_dir(path: str | Path) -> Path:
    """A step directory (meta.json + model/), from itself, its model/ dir or a run directory
    (its newest complete checkpoint)."""
    from spark_mcore.checkpoint.io import list_checkpoints

    p = require_dir(path, "megatron checkpoint")
    if p.name == "model" and (p.parent / "meta.json").is_file():
        return p.parent
    if (p / "meta.json").is_file() and (p / "model").is_dir():
        return p
    steps = list_checkpoints(p)
    if steps:
        return steps[-1]
    raise ConversionError(f"{p} is not a megatron checkpoint: expected a step directory "
                          "(meta.json + model/) or a run directory with checkpoints/step_N/")


@dataclass
class _McoreSource:
    step_dir: Path
    family: str
    cfg: ModelConfig
    vocab_size: int
    hf_raw: dict[str, Any] | None
    aux_dir: Path | None


def _hf_spec(path: Path, dtype: str) -> tuple[str, ModelConfig, dict[str, Any]]:
    """From an HF config.json (or a directory holding one)."""
    hf_dir = path.parent if path.is_file() else path
    if path.is_file() and path.name != "config.json":
        raise ConversionError(f"hf_config={path} must be a config.json or its directory")
    return inspect_hf(hf_dir, dtype)


def _inspect_mcore(step_dir: Path, hf_config: str | Path | None, ckpt_vocab: int | None) -> _McoreSource:
    """Model spec from (in order) `hf_config`, meta.json "model", the run's config.json."""
    meta = read_json(step_dir / "meta.json", "checkpoint meta")
    run_cfg_path = step_dir.parent.parent / "config.json"
    tokenizer_dir = step_dir.parent.parent / "tokenizer"
    aux = step_dir / AUX_DIRNAME if (step_dir / AUX_DIRNAME).is_dir() else (
        tokenizer_dir if tokenizer_dir.is_dir() else None)
    if hf_config is not None:
        family, cfg, raw = _hf_spec(Path(hf_config), meta.get("dtype", "fp32"))
        return _McoreSource(step_dir, family, cfg, cfg.vocab_size, raw, aux)
    if isinstance(meta.get("model"), dict):
        cfg = from_dict(ModelConfig, meta["model"], "meta.json model")
        vocab = int(meta.get("vocab_size") or cfg.vocab_size or ckpt_vocab or 0)
        return _McoreSource(step_dir, cfg.family, cfg, vocab, meta.get("hf_config"), aux)
    if run_cfg_path.is_file():
        model = read_json(run_cfg_path, "run config").get("model")
        if isinstance(model, dict):  # the trainer builds its model from model.* (hf_path only
            cfg = from_dict(ModelConfig, model, "model")  # loads weights), so this is the spec
            vocab = cfg.vocab_size or ckpt_vocab or 0
            return _McoreSource(step_dir, cfg.family, cfg, int(vocab), None, aux)
    raise ConversionError(
        f"{step_dir / 'meta.json'} has no 'model' config and {run_cfg_path} is missing: pass the "
        "model's HF config (hf_config=... / --hf-config DIR) so the architecture is known")


def convert_mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                        hf_config: str | Path | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                        progress: bool = True) -> Path:
    """Megatron dist checkpoint (any TP/PP) -> HF safetensors directory `out_dir`.

    mcore_dir: a step directory, its model/ directory, or a run directory (newest step).
    dtype: output dtype ("fp32" | "bf16" | "fp16"); None keeps the stored dtype.
    hf_config: config.json (or its directory) describing the model, for checkpoints whose
    meta.json has no "model" entry. Returns `out_dir`.
    """
    from spark_mcore.checkpoint import mcore_reader

    step_dir = resolve_step_dir(mcore_dir)
    reader = mcore_reader.DistCheckpointReader(step_dir / "model")
    src = _inspect_mcore(step_dir, hf_config, reader.dim0(_EMBEDDING))
    stored = reader.dtype(_EMBEDDING)
    out_dtype = dtype or _STORED_TO_DTYPE.get(stored, src.cfg.dtype)
    if out_dtype not in _TORCH_DTYPES:
        raise ConversionError(f"dtype={out_dtype!r} must be one of {sorted(_TORCH_DTYPES)}")
    if src.vocab_size <= 0:
        raise ConversionError(f"{step_dir}: vocab size unknown; pass hf_config=... (--hf-config)")
    out = _prepare_out_dir(Path(out_dir), overwrite)
    adapter = get_adapter(src.family, src.cfg)
    with mcore_reader.tp1_layout(adapter, src.cfg, src.vocab_size) as layout:
        groups: dict[int, list[str]] = {}
        for name in layout:
            groups.setdefault(_group_index(name), []).append(name)
        with ShardedSafetensorsWriter(out, max_shard_bytes) as writer:
            for group in tqdm(sorted(groups), desc="megatron -> HF (layers)", disable=not progress):
                full = reader.read({name: layout[name] for name in groups[group]})
                for name in groups[group]:
                    for hf_name, t in adapter.mcore_to_hf(name, full.pop(name)):
                        writer.add(hf_name, t.to(_TORCH_DTYPES[out_dtype]))
    _write_hf_config(out, src, adapter, out_dtype)
    _export_step_head(step_dir, out)
    return out


def _export_step_head(step_dir: Path, out: Path) -> None:
    """A model.step_head checkpoint's SPRM head goes beside the HF weights as
    step_head.safetensors (what `spark-mcore eval --select step-head` loads)."""
    from spark_mcore.models.step_head import StepHead, save_step_head

    path = step_dir / "step_head.pt"
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)["head"]  # tensors only, no code
    head = StepHead(int(state["net.0.weight"].shape[1]))
    head.load_state_dict(state)
    save_step_head(head, out)


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"output directory {out} is not empty; pass overwrite=True "
                                  "(--overwrite) or choose another directory")
        for old in [*out.glob("*.safetensors"), out / INDEX_NAME]:
            old.unlink(missing_ok=True)  # stale shards would shadow the new weights
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_hf_config(out: Path, src: _McoreSource, adapter: ModelAdapter, dtype: str) -> None:
    if src.aux_dir is not None:
        copy_files(aux_files(src.aux_dir), out, skip=("config.json",))
    if src.hf_raw is not None:
        raw = dict(src.hf_raw)
        for key in ("dtype", "torch_dtype"):
            if key in raw or key == "dtype":
                raw[key] = _DTYPE_NAMES[dtype]
        (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        return
    cfg = dataclasses.replace(src.cfg, dtype=dtype)  # type: ignore[arg-type]
    adapter.hf_config(cfg, src.vocab_size).save_pretrained(str(out))

