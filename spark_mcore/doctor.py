"""`spark-mcore doctor`: what this machine has (CUDA, GPUs, NCCL, Transformer Engine, apex,
SGLang and its NCCL, DALI, megatron-core) and which features of a run config need what is
missing. Exits 0 unless --strict and a configured feature cannot run. torch is imported only
when the command runs (building the CLI parser must not import it)."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
from dataclasses import dataclass, field

from spark_mcore.config import accel
from spark_mcore.config.loader import ConfigError

# run in the rollout environment's interpreter (it has its own torch, maybe another NCCL)
_SGLANG_PROBE = ("import json, torch\ntry:\n import sglang; v = sglang.__version__\nexcept Exception as e:\n"
                 " v = None; err = f'{type(e).__name__}: {e}'\nelse:\n err = None\n"
                 "nccl = '.'.join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None\n"
                 "print(json.dumps({'sglang': v, 'error': err, 'torch': torch.__version__, 'nccl': nccl}))")


ENABLES = {
    "CUDA": "GPU training, bf16 speed, NCCL weight sync",
    "NCCL": "weights.backend=nccl (trainer -> SGLang)",
    "transformer-engine": "model.transformer_impl=transformer_engine, trainer.fp8, parallel.sequence_parallel",
    "apex": "megatron's fused softmax / layer-norm kernels",
    "nvidia-dali": "GPU image decoding (PIL is used otherwise)",
}


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str
    needed_by: list[str] = field(default_factory=list)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nccl_version() -> str | None:
    """The NCCL torch is linked against (None on CPU builds)."""
    import torch

    if not torch.version.cuda:
        return None
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a broken NCCL is itself the finding
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def probe_sglang_env(python: str, timeout_s: float = 120.0) -> dict[str, str | None]:
    """sglang / torch / NCCL versions as the rollout interpreter sees them."""
    try:
        out = subprocess.run([python, "-c", _SGLANG_PROBE], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"sglang": None, "error": f"{python}: {type(e).__name__}: {e}", "torch": None, "nccl": None}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"sglang": None, "error": f"{python} exited {out.returncode}: {tail}", "torch": None, "nccl": None}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_findings(sglang_python: str | None) -> list[Finding]:
    import torch

    cuda = accel.cuda_available()
    gpus = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())] if cuda else []
    te_ok, te = accel.probe("transformer_engine.pytorch")
    apex_ok, apex = accel.probe("apex")
    softmax = accel.fused_softmax_available()
    nccl = nccl_version()
    out = [
        Finding("python", True, platform.python_version()),
        Finding("torch", True, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"),
        Finding("CUDA", cuda, f"{len(gpus)} GPU(s): {', '.join(gpus)}" if cuda else "no CUDA device"),
        Finding("NCCL", nccl is not None, nccl or "torch has no NCCL (CPU build)"),
        Finding("megatron-core", _version("megatron-core") is not None, _version("megatron-core") or "not installed"),
        Finding("transformer-engine", te_ok, te),
        Finding("apex", apex_ok, apex + ("; fused softmax kernels import" if softmax else
                                         "; fused softmax kernels missing (masked_softmax_fusion stays off)")),
        Finding("nvidia-dali", accel.probe("nvidia.dali")[0], accel.probe("nvidia.dali")[1]),
    ]
    local = importlib.util.find_spec("sglang") is not None
    out.append(Finding("sglang (this env)", local, _version("sglang") or "not installed here (expected in the "
                       "trainer image: SGLang lives in its own environment, see sglang.python)"))
    if sglang_python:
        env = probe_sglang_env(sglang_python)
        ok = env["sglang"] is not None
        detail = (f"sglang {env['sglang']}, torch {env['torch']}, NCCL {env['nccl']}" if ok else str(env["error"]))
        if ok and nccl and env["nccl"] and env["nccl"] != nccl:
            ok, detail = False, detail + (f"; trainer NCCL {nccl} differs: the weight-update group fails with "
                                          "'Mismatched NCCL version'; preload one libnccl in both (NCCL_LIBRARY / "
                                          "LD_PRELOAD, see docker/README)")
        out.append(Finding(f"sglang ({sglang_python})", ok, detail))
    return out


def feature_needs(cfg: object) -> dict[str, list[str]]:
    """Finding name -> the configured features that need it."""
    needs: dict[str, list[str]] = {}

    def need(what: str, feature: str) -> None:
        needs.setdefault(what, []).append(feature)

    model, trainer, parallel = cfg.model, cfg.trainer, cfg.parallel  # type: ignore[attr-defined]
    if model.transformer_impl == "transformer_engine":
        need("transformer-engine", "model.transformer_impl=transformer_engine")
    for flag, on in (("trainer.fp8", trainer.fp8 is not None), ("parallel.sequence_parallel", parallel.sequence_parallel)):
        if on:
            need("transformer-engine", flag)
            need("CUDA", flag)
    if cfg.rollout.engine == "sglang":  # type: ignore[attr-defined]
        need("CUDA", "rollout.engine=sglang")
        need("sglang", "rollout.engine=sglang")
        need("NCCL", "rollout.engine=sglang (weight sync)")
    if cfg.weights.mode == "colocated":  # type: ignore[attr-defined]
        need("CUDA", "weights.mode=colocated")
    return needs


def run_doctor(args: argparse.Namespace) -> int:
    from spark_mcore.config.run import load_run_config

    problems: list[str] = []
    needs: dict[str, list[str]] = {}
    sglang_python = args.sglang_python
    try:
        cfg = load_run_config(args.config, args.overrides)
        needs = feature_needs(cfg)
        sglang_python = sglang_python or getattr(cfg.sglang, "python", None)
    except ConfigError as e:
        problems.append(f"config: {e}")
    findings = machine_findings(sglang_python)
    for f in findings:
        f.needed_by = needs.get(f.name.split(" ")[0], [])
        mark = "ok     " if f.ok else "missing"
        used = f"  <- needed by {', '.join(f.needed_by)}" if f.needed_by else ""
        enables = f"  (would enable: {ENABLES[f.name]})" if not f.ok and f.name in ENABLES and not used else ""
        print(f"[{mark}] {f.name:<20} {f.detail}{used}{enables}")
        if not f.ok and f.needed_by:
            problems.append(f"{f.name} is missing but {', '.join(f.needed_by)} needs it")
    for p in problems:
        print(f"PROBLEM: {p}")
    if not problems:
        print("every configured feature can run here")
    return 1 if (args.strict and problems) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run YAML whose features to check (default: the embedded demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sglang-python", help="interpreter of the SGLang environment (default: sglang.python)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a configured feature cannot run")
