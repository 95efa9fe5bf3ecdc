"""`spark-mcore` command line: parses arguments and dispatches; the work lives in the packages."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from spark_mcore.errors import DEBUG_ENV, report

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    def deco(fn: Command) -> Command:
        _COMMANDS[name] = (configure, fn)
        return fn

    return deco


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run file (default: the embedded tiny CPU demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.lr=1e-5 (repeatable)")


@command("train", _train_args)
def _train(args: argparse.Namespace) -> int:
    from spark_mcore.config.run import load_run_config

    cfg = load_run_config(args.config, args.overrides)  # a config error costs no torch import
    import torch

    from spark_mcore.engines import check_weight_mode

    check_weight_mode(cfg, torch.cuda.is_available())  # before megatron and the trainer are imported
    from spark_mcore.train import train

    train(cfg)
    return 0


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", required=True, metavar="tcp://HOST:PORT",
                   help="the trainer's stream endpoint (printed by the trainer, and in <checkpoint.dir>/stream_endpoint)")
    _train_args(p)
    p.add_argument("--name", help="worker name in the trainer's logs (default: worker-<pid>)")
    p.add_argument("--capacity", type=int, help="prompts to hold at once (default: transport.credits_per_worker)")


@command("rollout-worker", _worker_args)
def _rollout_worker(args: argparse.Namespace) -> int:
    import logging

    from spark_mcore.config.run import load_run_config
    from spark_mcore.rollout_worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_run_config(args.config, args.overrides)
    return run_worker(args.connect, cfg, args.name, args.capacity)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or exported HF directory")
    p.add_argument("--data", default="builtin:arith", help="builtin:arith or a JSONL file")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--samples", type=int, default=0,
                   help="also report the mean accuracy of N sampled responses per prompt (avg@N)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data.* overrides for builtin tasks, e.g. --set data.levels=[1]")
    p.add_argument("--self-reflect", action="store_true",
                   help="solve, let the model judge its answer and revise rejected ones; report accuracy "
                        "before/after and judge rejection rates (replaces the plain greedy run)")
    p.add_argument("--rounds", type=int, default=2, help="self-reflection rounds (judge + revise)")
    p.add_argument("--reward-bench", metavar="FILE.jsonl|builtin:arith",
                   help="judge accuracy: pairwise rows question/chosen/rejected (both orders) and "
                        "pointwise rows question/response/label; builtin:arith builds a held-out set "
                        "from the arith test split (right vs wrong worked solutions)")
    p.add_argument("--view", choices=["cot", "answer"], default="cot",
                   help="what judge prompts show of a response: the full solution or the boxed answer")
    p.add_argument("--seed", type=int, default=0, help="template choice and the builtin judge set")
    p.add_argument("--best-of", type=int, default=0, metavar="N",
                   help="sample N responses per prompt at --temperature, keep the one --select scores "
                        "highest; report its accuracy against pass@N and avg@N")
    p.add_argument("--select", choices=["step-head", "judge"], default="step-head",
                   help="--best-of selector: the SPRM step head exported with model.step_head=true "
                        "(step_head.safetensors), or the model as SPARK's pointwise judge (P(Yes))")
    p.add_argument("--step-delimiter", default=None,
                   help="text ending a reasoning step for --select step-head (default: the run's "
                        "step_head.delimiter, else '. ')")


@command("eval", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    from spark_mcore.eval.cli import run_eval

    return run_eval(args)


def _convert_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="direction", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors dir -> <out>/checkpoints/step_N")
    h2m.add_argument("--hf", required=True, help="Hugging Face model directory (safetensors)")
    h2m.add_argument("--out", required=True, help="run directory to write checkpoints/step_N into")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the output")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the output")
    h2m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="parameter dtype (default: the HF config's dtype)")
    h2m.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
    m2h = sub.add_parser("mcore-to-hf", help="megatron checkpoint (any TP/PP) -> HF safetensors dir")
    m2h.add_argument("--mcore", required=True, help="step directory or run directory (newest step)")
    m2h.add_argument("--out", required=True, help="output Hugging Face directory")
    m2h.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="output dtype (default: the checkpoint's)")
    m2h.add_argument("--hf-config", default=None,
                     help="config.json (or its dir) when meta.json carries no model config")
    m2h.add_argument("--max-shard-gb", type=float, default=2.0, help="max safetensors file size")
    for q in (h2m, m2h):
        q.add_argument("--overwrite", action="store_true", help="replace an existing output")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")


def _convert_hf_to_mcore(args: argparse.Namespace) -> Path:
    from spark_mcore.checkpoint.convert import convert_hf_to_mcore

    return convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                               step=args.step, overwrite=args.overwrite,
                               progress=not args.no_progress)


def _convert_mcore_to_hf(args: argparse.Namespace) -> Path:
    from spark_mcore.checkpoint.convert import convert_mcore_to_hf

    return convert_mcore_to_hf(args.mcore, args.out, dtype=args.dtype, hf_config=args.hf_config,
                               max_shard_bytes=int(args.max_shard_gb * 1024**3),
                               overwrite=args.overwrite, progress=not args.no_progress)


_CONVERSIONS: dict[str, Callable[[argparse.Namespace], Path]] = {
    "hf-to-mcore": _convert_hf_to_mcore, "mcore-to-hf": _convert_mcore_to_hf}


@command("convert", _convert_args)
def _convert(args: argparse.Namespace) -> int:
    out = _CONVERSIONS[args.direction](args)
    print(f"wrote {out}", flush=True)
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    from spark_mcore.plan.report import add_arguments

    add_arguments(p)


@command("plan", _plan_args)
def _plan(args: argparse.Namespace) -> int:
    from spark_mcore.plan.report import run_plan

    return run_plan(args)


def _doctor_args(p: argparse.ArgumentParser) -> None:
    from spark_mcore.doctor import add_arguments

    add_arguments(p)


@command("doctor", _doctor_args)
def _doctor(args: argparse.Namespace) -> int:
    from spark_mcore.doctor import run_doctor

    return run_doctor(args)


# megatron-core warns at import that Transformer Engine / Apex are missing and it uses its torch
# fallbacks (8 lines per command on CPU). That is a fact about the installation, reported once
# by `spark-mcore doctor` and in the run directory's backends.txt, not on every command.
_KNOWN_WARNINGS = [r".*(Transformer Engine|Apex).* not installed", r"full scope is deprecated"]


def quiet_known_warnings() -> None:
    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-mcore", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name)
        configure(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"print the traceback of an error (also: {DEBUG_ENV}=1)")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a command. An error is one line naming the setting or file and the fix (exit 2 for
    user errors, 1 for internal ones; `--debug` shows the traceback): see spark_mcore/errors.py."""
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"  # also for torchrun ranks and helper processes
    quiet_known_warnings()
    try:
        return args.func(args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line (torch's
        return report(e)  # CheckpointException is a BaseException)


if __name__ == "__main__":
    sys.exit(main())
