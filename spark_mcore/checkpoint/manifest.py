"""A checkpoint's list of files and sizes, written last and checked before loading.

`manifest.json` maps every file of a checkpoint directory (relative path) to its size in bytes.
It is written after all ranks finished writing, before meta.json and the rename that make the
checkpoint count as complete. At resume, a checkpoint whose files are missing or have another
size is reported and skipped in favour of the newest one that is intact (`newest_intact`).
Checkpoints written before manifests existed are accepted as they are.

Also here: the disk space a save needs (for a clear ENOSPC message) and its detection.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST = "manifest.json"


def scan(ckpt: Path) -> dict[str, int]:
    """{relative path: size} of every file under `ckpt` except the manifest itself."""
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(ckpt: Path) -> dict[str, int]:
    files = scan(ckpt)
    (ckpt / MANIFEST).write_text(json.dumps({"files": files, "total_bytes": sum(files.values())}, indent=1))
    return files


def check(ckpt: Path) -> str | None:
    """None when `ckpt` holds every file of its manifest with the recorded size, else what is wrong."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None if (ckpt / "meta.json").is_file() else "no meta.json (the save did not finish)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is damaged ({e})"
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"file {rel} is missing"
        if p.stat().st_size != size:
            return f"file {rel} has {p.stat().st_size} bytes, the manifest says {size}"
    return None


def newest_intact(candidates: Iterable[Path], warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint (candidates oldest first) that passes `check`; each newer one that
    does not is reported through `warn`."""
    for ckpt in reversed(list(candidates)):
        problem = check(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: skipping checkpoint {ckpt}: {problem}; trying the one before it")
    return None


def checkpoint_bytes(ckpt: Path) -> int:
    """Size of a complete checkpoint, from its manifest (or by walking it)."""
    try:
        return int(json.loads((ckpt / MANIFEST).read_text())["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return sum(scan(ckpt).values()) if ckpt.is_dir() else 0


def is_disk_full(exc: BaseException, directory: Path, needed: int) -> bool:
    """Whether a failed write was (most likely) a full disk. megatron's torch writer reports
    ENOSPC as an opaque RuntimeError ("unexpected pos ..."), so besides the errno anywhere in
    the exception chain, too little free space left on `directory` counts."""
    seen: BaseException | None = exc
    for _ in range(16):  # the chain is short; the bound guards against a cycle
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


__all__ = ["MANIFEST", "scan", "write_manifest", "check", "newest_intact", "checkpoint_bytes", "is_disk_full",
           "human_bytes"]
