from pathlib import Path

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import RunConfig, load_run_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


def test_defaults_and_overrides() -> None:
    cfg = load_run_config(None, ["trainer.lr=1e-5", "rollout.n=4", "data.levels=[1, 3]", "algo.clip_eps_high=0.28"])
    assert isinstance(cfg, RunConfig)
    assert cfg.trainer.lr == 1e-5
    assert cfg.rollout.n == 4
    assert cfg.data.levels == [1, 3]
    assert cfg.algo.clip_eps_high == 0.28
    assert cfg.algo.clip_eps == 0.2  # untouched default


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_load(path: Path) -> None:
    load_run_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.lrr=1e-5", "unknown config key 'trainer.lrr' in override 'trainer.lrr'. Did you mean 'lr'?"),
        ("trainr.lr=1e-5", "Did you mean 'trainer'?"),
        ("rollout.n=abc", "rollout.n: expected an integer, got str 'abc'"),
        ("rollout.n=2.5", "rollout.n: expected an integer"),
        ("algo.kl_estimator=k5", "algo.kl_estimator: 'k5' is not one of 'k1', 'k2', 'k3'"),
        ("model.num_query_groups=3", "model.num_query_groups=3 must divide model.num_attention_heads=4"),
        ("logging.tensorboard=maybe", "logging.tensorboard: expected true/false"),
        ("data.levels=3", "data.levels: expected a list"),
        ("trainer.lr", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  steps: 3\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.micro_batch'.*'micro_batch_size'"):
        load_run_config(path)


def test_yaml_type_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  temperature: hot\n")
    with pytest.raises(ConfigError, match="rollout.temperature: expected a number"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_run_config(path)


def test_parallel_features_that_need_cuda_fail_early_on_cpu() -> None:
    import torch

    from spark_mcore.distributed.config import ParallelConfig

    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true needs parallel.tp > 1"):
        load_run_config(None, ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="recompute_method"):
        load_run_config(None, ["parallel.recompute_granularity=full"])
    if not torch.cuda.is_available():
        ParallelConfig(use_distributed_optimizer=True).check_device()  # CPU shim 8
        with pytest.raises(ConfigError, match="sequence_parallel=true needs CUDA"):
            ParallelConfig(tp=2, sequence_parallel=True).check_device()
    overrides = ParallelConfig(tp=2, cp=2, recompute_granularity="selective").transformer_overrides()
    assert overrides["context_parallel_size"] == 2 and overrides["recompute_granularity"] == "selective"


_NO_TORCH = """
import contextlib, io, sys
from spark_mcore.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:]) if sys.argv[1:] != ["--help"] else None
    if code is None:
        try:
            main(["train", "--help"])
        except SystemExit as e:
            code = e.code
heavy = sorted(m for m in ("torch", "megatron", "transformers", "sympy") if m in sys.modules)
print(code, heavy, err.getvalue().strip())
"""


@pytest.mark.parametrize("argv,code,message,imported", [
    (["train", "--set", "trainer.lrr=1"], "2", "config error: unknown config key 'trainer.lrr'.*Did you mean 'lr'",
     "["),
    (["train", "--set", "weights.mode=ipc"], "2", "config error: weights.mode='ipc' is unknown", "["),
    (["--help"], "0", "", "["),
    # needs torch to ask for CUDA, but fails before megatron, transformers or any model
    (["train", "--set", "weights.mode=colocated"], "2", "config error: weights.mode=colocated .*no CUDA",
     "['torch'"),
])
def test_config_errors_and_help_import_no_torch(argv: list[str], code: str, message: str, imported: str) -> None:
    """`spark-mcore train --help` and a config typo answer without importing torch or megatron."""
    import re

    import torch

    if "weights.mode=colocated" in argv and torch.cuda.is_available():
        pytest.skip("colocated can run here")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    got_code, rest = out.split(" ", 1)
    assert got_code == code, out
    assert rest.split("]")[0] == imported, f"imported {rest.split(']')[0]}]: {out}"
    assert re.search(message, rest), out


def test_import_run_config_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, spark_mcore.config.run as r; r.load_run_config(None, ['rollout.engine=sglang']); "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True).stdout.strip() == "[]"
