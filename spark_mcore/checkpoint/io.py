"""Saving the policy: megatron `dist_checkpointing` (any TP/PP layout) and a Hugging Face export.

Checkpoints are written to `<dir>/checkpoints/.tmp-step_N` and renamed to `step_N` only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from megatron.core import dist_checkpointing
from safetensors.torch import save_file

from spark_mcore.distributed.cpu_shims import check_dist_checkpointing_ready

if TYPE_CHECKING:
    from spark_mcore.runtime import Run

STEP_PREFIX = "step_"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
            and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def save_checkpoint(run: "Run", step: int) -> Path:
    """Writes model weights (sharded) + meta; keeps the newest `checkpoint.keep_last`."""
    root = checkpoint_root(run.run_dir)
    final = root / f"{STEP_PREFIX}{step}"
    tmp = root / f".tmp-{STEP_PREFIX}{step}"
    main = run.pstate.rank == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        check_dist_checkpointing_ready(tmp / "model")
    _barrier()
    dist_checkpointing.save(run.actor.unwrapped.sharded_state_dict(prefix=""), str(tmp / "model"))
    _barrier()
    if main:
        meta = {"step": step, "policy_version": run.engine.policy_version,
                "tp": run.pstate.tp_size, "pp": run.pstate.pp_size}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run.run_dir)[: -max(run.cfg.checkpoint.keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved checkpoint {final}", flush=True)
    _barrier()
    return final


def load_model_weights(run: "Run", ckpt: Path) -> None:
    """Loads model weights saved under any TP/PP layout into this run's layout."""
    model = run.actor.unwrapped
    state = dist_checkpointing.load(model.sharded_state_dict(prefix=""), str(ckpt / "model"))
    model.load_state_dict(state, strict=False)


def export_hf(run: "Run", out_dir: Path) -> Path:
    """safetensors + config.json + tokenizer that `AutoModelForCausalLM.from_pretrained` loads."""
    tensors = {name: t.detach().to(torch.float32 if run.cfg.model.dtype == "fp32" else t.dtype)
               .contiguous().clone() for name, t in run.actor.export_hf()}
    if run.pstate.rank != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = run.actor.hf_config(run.tokenizer)
    hf_cfg.save_pretrained(out_dir)
    run.tokenizer.save_pretrained(out_dir)
    print(f"exported Hugging Face model to {out_dir}", flush=True)
    return out_dir


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
