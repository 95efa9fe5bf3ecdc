"""transport.malloc: freed message buffers stay in the process (no page faults for the next one)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.transport.config import StreamConfig
from spark_mcore.transport.malloc import keep_freed_memory

# Rounds of eight 1 MiB buffers, written and freed together (as a message's frames are): with
# glibc's defaults each round's free trims the heap and the next faults ~2048 pages back in.
_PROBE = """
import resource, sys
import numpy as np
from spark_mcore.transport.malloc import keep_freed_memory
changed = keep_freed_memory(int(sys.argv[1]))
def round_():
    bufs = [np.empty(1 << 20, np.uint8) for _ in range(8)]
    for b in bufs:
        b.fill(1)
round_()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print(changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(keep_mb: int, env: dict[str, str] | None = None) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(keep_mb)], env={**clean, **(env or {})},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_kept_memory_removes_the_page_faults_of_reallocated_buffers() -> None:
    changed, kept = _faults(128)
    unchanged, default = _faults(0)
    assert (changed, unchanged) == ("True", "False")
    # the default trims and faults each round back in (~2048 faults per round with 4 KiB pages,
    # fewer with transparent huge pages, but never none); kept memory is reused without faults
    assert default >= 20, default
    assert kept <= default // 20, (kept, default)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_the_users_own_glibc_settings_win() -> None:
    changed, _ = _faults(128, {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert changed == "False"
    assert keep_freed_memory(0) is False


@pytest.mark.parametrize("bad", [-1, 2048])
def test_malloc_keep_mb_is_bounded(bad: int) -> None:
    with pytest.raises(ConfigError, match="transport.malloc_keep_mb"):
        StreamConfig(malloc_keep_mb=bad)
