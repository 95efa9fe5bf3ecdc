#!/usr/bin/env bash
# Runs the given command; prints the versions that matter first so logs say what ran.
set -euo pipefail
python - <<'PY'
import importlib
for name in ("torch", "megatron.core", "transformer_engine", "sglang", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'installed')}")
    except Exception as exc:  # optional packages
        print(f"{name}: not available ({type(exc).__name__})")
PY
exec "$@"
