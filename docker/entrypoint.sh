#!/usr/bin/env bash
# Prints the versions that matter (so logs say what ran), exports SHARED_NCCL when the image
# carries the shared NCCL build, then runs the given command.
set -euo pipefail
if [[ -z "${SHARED_NCCL:-}" && -e "${SHARED_NCCL_DIR:-/opt/nccl}/lib/libnccl.so.2" ]]; then
  export SHARED_NCCL="${SHARED_NCCL_DIR:-/opt/nccl}/lib/libnccl.so.2"
fi
python - <<'PY'
import importlib
import os

for name in ("torch", "megatron.core", "transformer_engine", "sglang", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'installed')}")
    except Exception as exc:  # optional packages
        print(f"{name}: not available ({type(exc).__name__})")
try:
    import torch

    if torch.version.cuda:
        print("torch NCCL:", ".".join(map(str, torch.cuda.nccl.version())))
except Exception as exc:
    print(f"torch NCCL: unknown ({type(exc).__name__})")
print("SHARED_NCCL:", os.environ.get("SHARED_NCCL", "(not set)"))
PY
exec "$@"
