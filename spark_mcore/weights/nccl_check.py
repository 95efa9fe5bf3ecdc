"""NCCL build agreement between trainer and SGLang (fault 2).

Trainer (NGC torch) and SGLang (its own torch wheel) may link different NCCL builds; NCCL then
fails the weight-update group at init ("Mismatched NCCL version detected"), from either side.
The cure is one libnccl.so.2 preloaded in both environments (docker/Dockerfile.*, SHARED_NCCL in
examples/launch_common.sh). Here: the trainer's version for the log, and a failure to form the
group turned into a message that says which NCCL the trainer runs and what to do.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

FIX = ("preload the same libnccl.so.2 in trainer and SGLang environments (SHARED_NCCL / LD_PRELOAD, see "
       "docker/Dockerfile.rollout and docker/Dockerfile.trainer) and compare both with "
       "`spark-mcore doctor --sglang-python <rollout python>`")


def local_nccl_version() -> str | None:
    """The NCCL this process's torch uses ("2.27.3"), None on CPU builds."""
    import torch

    if not torch.version.cuda:
        return None
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a missing or broken NCCL reads as unknown
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def explain_group_failure(error: BaseException, backend: str, trainer_nccl: str | None) -> str:
    """The text to raise when forming an NCCL weight-update group failed."""
    text = str(error)
    if backend != "nccl":
        return text
    lowered = text.lower()
    if "mismatched nccl version" in lowered or "nccl version" in lowered:
        return (f"NCCL versions differ between the trainer (NCCL {trainer_nccl or 'unknown'}) and the SGLang "
                f"servers, so the weight-update group cannot form: {text}\nFix: {FIX}")
    return f"{text}\n(trainer NCCL {trainer_nccl or 'unknown'}; if the servers use another NCCL build: {FIX})"


def log_trainer_nccl(backend: str) -> str | None:
    version = local_nccl_version() if backend == "nccl" else None
    if version:
        logger.info("weight sync: trainer NCCL %s (the SGLang servers must use the same build)", version)
    return version
