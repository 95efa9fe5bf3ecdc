"""Checkpoints: megatron `dist_checkpointing` for model, reference and optimizer (any TP/PP
layout on load), a JSON trainer state (step counters, LR schedule, data-loader position, SPARK
cache), and a Hugging Face export.

A checkpoint is written to `<dir>/checkpoints/.tmp-step_N` and renamed to `step_N` only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import dist_checkpointing
from safetensors.torch import save_file

from spark_mcore.config.loader import to_dict
from spark_mcore.distributed.cpu_shims import check_dist_checkpointing_ready

if TYPE_CHECKING:
    from spark_mcore.runtime import Run

STEP_PREFIX = "step_"
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
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _save_sharded(tmp: Path, run: Run) -> None:
    actor = run.actor
    model_sd = actor.unwrapped.sharded_state_dict(prefix="")
    dist_checkpointing.save(model_sd, str(check_dist_checkpointing_ready(tmp / "model")))
    if actor.optimizer is not None:
        optim_sd = actor.optimizer.sharded_state_dict(actor.unwrapped.sharded_state_dict(prefix=""))
        dist_checkpointing.save(optim_sd, str(check_dist_checkpointing_ready(tmp / "optim")))
    if actor.ref is not None:
        dist_checkpointing.save(actor.ref.sharded_state_dict(prefix=""),
                                str(check_dist_checkpointing_ready(tmp / "ref")))


def save_checkpoint(run: Run, step: int, trainer_state: dict[str, Any] | None = None) -> Path:
    """Writes model/optimizer/reference + trainer state; keeps the newest `checkpoint.keep_last`."""
    root = checkpoint_root(run.run_dir)
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f".tmp-{STEP_PREFIX}{step}"
    main = run.pstate.rank == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _save_sharded(tmp, run)
    _barrier()
    if main:
        state = dict(trainer_state or {})
        if run.actor.scheduler is not None:
            state["scheduler"] = run.actor.scheduler.state_dict()
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        meta = {"step": step, "policy_version": run.engine.policy_version, "tp": run.pstate.tp_size,
                "pp": run.pstate.pp_size, "family": run.cfg.model.family, "vocab_size": run.actor.vocab_size,
                "dtype": run.cfg.model.dtype, "model": to_dict(run.cfg.model)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run.run_dir)[: -max(run.cfg.checkpoint.keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint {final}", flush=True)
    _barrier()
    return final


def load_checkpoint(run: Run, ckpt: Path) -> dict[str, Any]:
    """Restores model, reference and optimizer (resharded to this run's TP/PP) and returns the
    trainer state. Call after `setup_optimizer` and `snapshot_reference`."""
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no meta.json)")
    actor = run.actor
    model = actor.unwrapped
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(prefix=""), str(ckpt / "model")))
    if actor.ref is not None:
        if not (ckpt / "ref").is_dir():
            raise FileNotFoundError(f"{ckpt} has no reference model but algo.kl_coef > 0; "
                                    f"resume with algo.kl_coef=0 or from a checkpoint saved with KL")
        actor.ref.load_state_dict(dist_checkpointing.load(actor.ref.sharded_state_dict(prefix=""), str(ckpt / "ref")))
    if actor.optimizer is not None and (ckpt / "optim").is_dir():
        actor.optimizer.reload_model_params()
        optim_sd = actor.optimizer.sharded_state_dict(model.sharded_state_dict(prefix=""), is_loading=True)
        actor.optimizer.load_state_dict(dist_checkpointing.load(optim_sd, str(ckpt / "optim")))
    state = json.loads((ckpt / TRAINER_STATE).read_text()) if (ckpt / TRAINER_STATE).is_file() else {}
    if actor.scheduler is not None and "scheduler" in state:
        actor.scheduler.load_state_dict(state["scheduler"])
    return state


def export_hf(run: Run, out_dir: Path) -> Path:
    """safetensors + config.json + tokenizer that `AutoModelForCausalLM.from_pretrained` loads."""
    tensors = {name: t.detach().contiguous().clone() for name, t in run.actor.export_hf()}
    if run.pstate.rank != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    run.actor.hf_config(run.tokenizer).save_pretrained(out_dir)
    source = run.run_dir / "tokenizer"
    if (source / "tokenizer.json").is_file():
        # copy the files byte for byte: a save_pretrained round trip can re-serialise the
        # tokenizer (transformers 5 rewrote its normaliser), changing ids of the export
        shutil.copytree(source, out_dir, dirs_exist_ok=True)
    else:
        run.tokenizer.save_pretrained(out_dir)
    print(f"exported Hugging Face model to {out_dir}", flush=True)
    return out_dir


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
