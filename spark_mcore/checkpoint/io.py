"""Checkpoints: megatron `dist_checkpointing` for model, reference and optimizer (any TP/PP
layout on load), a JSON trainer state (step counters, LR schedule, data-loader position, SPARK
cache), and a Hugging Face export.

A checkpoint is written to `<dir>/checkpoints/.tmp-step_N` and renamed to `step_N` only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest one.

Resuming under another TP/PP layout needs nothing special: every tensor, Adam's moments
included, is stored as a global `ShardedTensor` and megatron reshards on load (the optimizer's
param-group index lists are local objects, rebuilt by the loading run, and Adam's step is one
common value). What cannot be bridged (model sizes, vocabulary, optimizer kind and dtype) is
checked against meta.json before any tensor is read (checkpoint/compat.py).
tests/integration/test_checkpoint_reshard.py checks world size 1 <-> TP2, TP2xPP2 and PP2.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import dist_checkpointing
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException as _CheckpointException

from spark_mcore.checkpoint import manifest
from spark_mcore.checkpoint.compat import check_compatible
from spark_mcore.checkpoint.config import STEP_PREFIX
from spark_mcore.config.loader import to_dict
from spark_mcore.distributed.cpu_shims import check_dist_checkpointing_ready
from spark_mcore.distributed.orphans import die_with_parent
from spark_mcore.errors import CheckpointError, DiskFullError

if TYPE_CHECKING:
    from spark_mcore.trainer.actor import MegatronActor

TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
            and p.name[len(STEP_PREFIX):].isdigit() and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; newer damaged ones are
    reported (once, by rank 0) and skipped."""
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    return manifest.newest_intact(list_checkpoints(run_dir), lambda msg: main and print(msg, flush=True))


def _save_sharded(tmp: Path, actor: MegatronActor) -> None:
    """Collective: the dist checkpoints of the policy, its optimizer and the KL reference.

    Each holds global tensors (`ShardedTensor`s with their TP offsets and global layer
    numbers), which is what lets `load_actor_state` read them back under another TP/PP layout."""
    dist_checkpointing.save(actor.sharded_state_dict(), str(check_dist_checkpointing_ready(tmp / "model")))
    if actor.optimizer is not None:
        dist_checkpointing.save(_optimizer_sharded_state_dict(actor), str(check_dist_checkpointing_ready(tmp / "optim")))
    if actor.ref_chunks is not None:
        dist_checkpointing.save(actor.sharded_state_dict(reference=True),
                                str(check_dist_checkpointing_ready(tmp / "ref")))
    if actor.step_head is not None:  # model.step_head: one last-stage rank writes the replicated head
        actor.step_head.save(tmp)


# megatron's default format for the distributed optimizer ("fully_sharded_model_space") builds
# ShardedTensors with `flattened_range`, which dist_checkpointing 0.16 / 0.19 rejects; in
# "fully_reshardable" every Adam moment has its parameter's global shape (gathered over DP on
# save, sliced on load), so a checkpoint reshards over TP, PP and DP like the plain optimizer's.
_DISTRIB_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizer_sharded_state_dict(actor: MegatronActor, is_loading: bool = False) -> dict[str, Any]:
    """The optimizer's dist-checkpoint state (collective with the distributed optimizer)."""
    metadata = _DISTRIB_OPTIM_METADATA if actor.parallel.use_distributed_optimizer else None
    return actor.optimizer.sharded_state_dict(actor.sharded_state_dict(), is_loading=is_loading,
                                              metadata=metadata)


def actor_meta(actor: MegatronActor) -> dict[str, Any]:
    """meta.json fields that describe what the weights and optimizer state are: the layout
    that wrote them (informational: loads reshard) and what a loader must match."""
    return {"tp": actor.pstate.tp_size, "pp": actor.pstate.pp_size, "family": actor.model_cfg.family,
            "vocab_size": actor.vocab_size, "dtype": actor.model_cfg.dtype,
            "model": to_dict(actor.model_cfg),
            "optimizer": {"distributed": bool(actor.parallel.use_distributed_optimizer)}}


def write_checkpoint(actor: MegatronActor, root: Path, step: int, trainer_state: dict[str, Any] | None = None,
                     extra_meta: dict[str, Any] | None = None) -> Path:
    """Collective: writes `<root>/step_<step>` (model, optimizer, reference, trainer state with
    the LR schedule, meta.json last) through a temporary directory renamed when complete."""
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f".tmp-{STEP_PREFIX}{step}"
    main = actor.pstate.rank == 0
    needed = _bytes_needed(actor, root)
    die_with_parent()  # megatron's writer starts helper processes: they must not outlive a SIGKILL
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        _save_sharded(tmp, actor)
        _barrier()
        if main:
            state = dict(trainer_state or {})
            if actor.scheduler is not None:
                state["scheduler"] = actor.scheduler.state_dict()
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            manifest.write_manifest(tmp)  # every file and its size, checked before a load
            meta = {"step": step, **(extra_meta or {}), **actor_meta(actor)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completeness
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        _save_failed(e, tmp, root, needed, main)
        raise
    _barrier()
    return final


def _bytes_needed(actor: MegatronActor, root: Path) -> int:
    """About what one checkpoint takes: the newest existing one's size, else this rank's
    parameters x (model + reference + Adam's two fp32 moments)."""
    done = sorted((p for p in root.glob(f"{STEP_PREFIX}*") if (p / "meta.json").is_file()),
                  key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if done:
        return manifest.checkpoint_bytes(done[-1])
    params = [p for chunk in actor.chunks for p in chunk.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = 2 * 4 * sum(p.numel() for p in params) if actor.optimizer is not None else 0
    return weights * (2 if actor.ref_chunks is not None else 1) + moments


def _save_failed(exc: BaseException, tmp: Path, root: Path, needed: int, main: bool) -> None:
    """Removes the partial checkpoint; a full disk becomes a DiskFullError naming the
    directory, the bytes needed and the fix (megatron's writer reports it opaquely)."""
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(exc, Exception | _CheckpointException) and manifest.is_disk_full(exc, root, needed):
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        raise DiskFullError(
            f"no space left on device while saving a checkpoint in {root}: it needs about {needed} bytes "
            f"({manifest.human_bytes(needed)}), {free} bytes are free (the partial {tmp.name} was removed). "
            "Fix: free space there, lower checkpoint.keep_last, or set checkpoint.dir to a larger disk"
        ) from exc


def save_checkpoint(actor: MegatronActor, run_dir: Path, step: int, trainer_state: dict[str, Any] | None = None,
                    keep_last: int = 1, policy_version: int = 0) -> Path:
    """Collective: writes model/optimizer/reference + trainer state under `run_dir/checkpoints`
    (meta.json records `policy_version`, the engine's); keeps the newest `keep_last`."""
    final = write_checkpoint(actor, checkpoint_root(run_dir), step, trainer_state,
                             {"policy_version": policy_version})
    if actor.pstate.rank == 0:
        for old in list_checkpoints(run_dir)[: -max(keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint {final}", flush=True)
    _barrier()
    return final


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint (FileNotFoundError naming the directory otherwise)."""
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    return json.loads((ckpt / "meta.json").read_text())


def load_actor_state(actor: MegatronActor, ckpt: Path) -> dict[str, Any]:
    """Restores model, reference, optimizer and LR schedule from `ckpt` under this actor's
    TP/PP layout, whatever layout wrote it; returns the trainer state. Collective. Call after
    `setup_optimizer` and `snapshot_reference`."""
    meta = read_meta(ckpt)
    has_optim = actor.optimizer is not None and (ckpt / "optim").is_dir()
    check_compatible(meta, actor.model_cfg, actor.vocab_size, optimizer=has_optim,
                     distributed_optimizer=actor.parallel.use_distributed_optimizer, where=ckpt)
    saved, ours = (meta.get("tp"), meta.get("pp")), (actor.pstate.tp_size, actor.pstate.pp_size)
    if saved != ours and actor.pstate.rank == 0:
        print(f"resharding {ckpt} from tp={saved[0]} pp={saved[1]} to tp={ours[0]} pp={ours[1]}", flush=True)
    problem = manifest.check(ckpt)
    if problem is not None:
        raise CheckpointError(f"{ckpt}: {problem}. Fix: delete or move that directory (the run then resumes "
                              "from the one before), or set checkpoint.resume=false")
    try:
        _load_tensors(actor, ckpt, has_optim)
    except CheckpointError:
        raise
    except (Exception, _CheckpointException) as e:  # noqa: BLE001 - CheckpointException and friends: 80+ lines
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt} cannot be read ({type(e).__name__}: {first}). Fix: delete or move that "
                              "directory (the run then resumes from the one before), or set "
                              "checkpoint.resume=false") from e
    state = json.loads((ckpt / TRAINER_STATE).read_text()) if (ckpt / TRAINER_STATE).is_file() else {}
    if actor.scheduler is not None and "scheduler" in state:
        actor.scheduler.load_state_dict(state["scheduler"])
    return state


def _load_tensors(actor: MegatronActor, ckpt: Path, has_optim: bool) -> None:
    """Collective: model, reference and optimizer state from the dist checkpoints of `ckpt`."""
    actor.load_state_dict(dist_checkpointing.load(actor.sharded_state_dict(), str(ckpt / "model")))
    if actor.ref_chunks is not None:
        if not (ckpt / "ref").is_dir():
            raise CheckpointError(f"{ckpt} has no reference model but algo.kl_coef > 0; "
                                  f"resume with algo.kl_coef=0 or from a checkpoint saved with KL")
        ref_sd = actor.sharded_state_dict(reference=True)
        actor.load_state_dict(dist_checkpointing.load(ref_sd, str(ckpt / "ref")), reference=True)
    if has_optim:
        actor.optimizer.reload_model_params()
        optim_sd = _optimizer_sharded_state_dict(actor, is_loading=True)
        actor.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(ckpt / "optim")))
    if actor.step_head is not None and not actor.step_head.load(ckpt):
        # a checkpoint from a run without the head: it starts fresh (said once per holder)
        if actor.pstate.tp_rank == 0 and actor.pstate.dp_rank == 0:
            print(f"{ckpt} has no step head (step_head.pt): model.step_head starts from a fresh head", flush=True)


def export_hf(actor: MegatronActor, tokenizer: Any, out_dir: Path, tokenizer_dir: Path | None = None, *,
              tensors: Iterable[tuple[str, torch.Tensor]], processor_config: dict[str, Any] | None = None) -> Path:
    """safetensors + config.json + tokenizer that `AutoModelForCausalLM.from_pretrained` loads.

    Collective: `tensors` is the whole model's (HF name, full tensor) stream from the
    `weights/` exporter (`spark_mcore.weights.gather.actor_hf_weights`), which every rank runs
    to the end and which yields the tensors on global rank 0, the one writer.
    `tokenizer_dir` (the run's saved tokenizer) is copied byte for byte when given: a
    save_pretrained round trip can re-serialise the tokenizer (transformers 5 rewrote its
    normaliser), changing the ids of the export. Without it, `tokenizer.save_pretrained` is used.
    `processor_config` (vision-language models): written as `preprocessor_config.json`, the image
    processor's settings a server needs to process images as the trainer does.
    """
    named = {name: t.detach().contiguous().clone() for name, t in tensors}
    if actor.pstate.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(named, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        actor.hf_config(tokenizer).save_pretrained(out_dir)
        if processor_config is not None:
            (out_dir / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
        if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
            shutil.copytree(tokenizer_dir, out_dir, dirs_exist_ok=True)
        else:
            tokenizer.save_pretrained(out_dir)
        print(f"exported Hugging Face model to {out_dir}", flush=True)
    _barrier()  # the export is complete before any rank reads it (e.g. a launched server)
    return out_dir


def export_step_head(actor: MegatronActor, out_dir: Path) -> Path | None:
    """Collective: writes the SPRM head as `<out_dir>/step_head.safetensors` (model.step_head)
    from one last-stage rank, beside an HF export; `models.step_head.load_step_head` reads it."""
    from spark_mcore.models.step_head import HEAD_FILE, save_step_head

    holder = actor.step_head
    if holder is not None and holder.pstate.tp_rank == 0 and holder.pstate.dp_rank == 0 and holder.pstate.cp_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_step_head(holder.head, out_dir)
    _barrier()
    return out_dir / HEAD_FILE if actor.model_cfg.step_head else None


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
