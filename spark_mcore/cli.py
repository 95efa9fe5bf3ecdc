"""`spark-mcore` command line: parses arguments and dispatches; the work lives in the packages."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from spark_mcore.config.loader import ConfigError

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
    from spark_mcore.train import train

    cfg = load_run_config(args.config, args.overrides)
    train(cfg)
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory or exported HF directory")
    p.add_argument("--data", default="builtin:arith", help="builtin:arith or a JSONL file")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
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


@command("eval", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    from spark_mcore.eval.cli import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-mcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in _COMMANDS.items():
        p = sub.add_parser(name)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
