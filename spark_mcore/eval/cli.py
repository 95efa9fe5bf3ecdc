"""`spark-mcore eval`: greedy accuracy of an exported (HF-format) checkpoint."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from spark_mcore.config.loader import ConfigError, apply_overrides, from_dict
from spark_mcore.data.chat import encode_prompt, stop_token_ids
from spark_mcore.data.config import DataConfig
from spark_mcore.data.dataset import load_prompts
from spark_mcore.data.tokenizer import load_tokenizer
from spark_mcore.eval.config import EvalConfig
from spark_mcore.eval.runner import evaluate_accuracy
from spark_mcore.rewards import VerifierPool, registered_verifiers
from spark_mcore.rewards.config import RewardConfig
from spark_mcore.rollout.hf_engine import HFEngine


def resolve_hf_dir(path: str) -> tuple[Path, Path | None]:
    """(HF model dir, run dir or None) from a run directory or an exported HF directory."""
    p = Path(path)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p, None
    if (p / "hf" / "config.json").is_file():
        return p / "hf", p
    raise ConfigError(f"--checkpoint {p}: neither an HF export (config.json + *.safetensors) nor a run "
                      f"directory with an hf/ export. Fix: pass <checkpoint.dir> of a finished run")


def _data_config(args: argparse.Namespace, run_dir: Path | None) -> DataConfig:
    tree: dict = {}
    if run_dir is not None and (run_dir / "config.json").is_file():
        tree = dict(json.loads((run_dir / "config.json").read_text()).get("data", {}))
    tree.update({"source": args.data, "eval_source": None if args.data.startswith("builtin:") else args.data})
    return from_dict(_EvalData, apply_overrides({"data": tree}, args.overrides, _EvalData)).data


@dataclass
class _EvalData:
    """Lets `--set data.*` overrides go through the same checks as `train`."""

    data: DataConfig = field(default_factory=DataConfig)


def run_eval(args: argparse.Namespace) -> int:
    hf_dir, run_dir = resolve_hf_dir(args.checkpoint)
    tokenizer = load_tokenizer(hf_dir)
    data_cfg = _data_config(args, run_dir)
    prompts = load_prompts(data_cfg, args.split, tokenizer, known_tasks=registered_verifiers())
    engine = HFEngine.from_pretrained(str(hf_dir), partial(tokenizer.decode, skip_special_tokens=True),
                                      pad_token_id=tokenizer.pad_token_id or 0)
    with VerifierPool(RewardConfig()) as pool:
        result = evaluate_accuracy(engine, prompts, partial(encode_prompt, tokenizer), stop_token_ids(tokenizer),
                                   pool.score, EvalConfig(max_new_tokens=args.max_new_tokens, limit=args.limit))
    print(f"accuracy={result.accuracy:.4f} on {result.num_prompts} prompts ({args.data}, split={args.split}); "
          f"mean response tokens {result.mean_response_tokens:.1f}")
    if args.out:
        result.write(args.out)
        print(f"wrote {args.out}")
    return 0
