"""`spark-mcore eval`: greedy accuracy of an exported (HF-format) checkpoint, and with
`--self-reflect` / `--reward-bench` the model as its own judge (see eval/judge_eval.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from spark_mcore.config.loader import ConfigError, apply_overrides, from_dict
from spark_mcore.data.chat import encode_prompt, stop_token_ids
from spark_mcore.data.config import DataConfig
from spark_mcore.data.dataset import load_prompts
from spark_mcore.data.tokenizer import load_tokenizer
from spark_mcore.errors import CheckpointError, check_writable_file
from spark_mcore.eval.config import EvalConfig
from spark_mcore.eval.judge_eval import (
    BUILTIN_ARITH,
    arith_judge_set,
    judge_eval,
    judge_table,
    load_reward_bench,
    self_reflect_dict,
    self_reflect_eval,
    self_reflect_table,
)
from spark_mcore.eval.runner import evaluate_accuracy
from spark_mcore.rewards import VerifierPool, registered_verifiers
from spark_mcore.rewards.config import RewardConfig
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.hf_engine import HFEngine
from spark_mcore.spark.judging import EncodeFn
from spark_mcore.types import Prompt


def resolve_hf_dir(path: str) -> tuple[Path, Path | None]:
    """(HF model dir, run dir or None) from a run directory or an exported HF directory."""
    p = Path(path)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return p, None
    if (p / "hf" / "config.json").is_file():
        return p / "hf", p
    raise ConfigError(f"--checkpoint {p}: neither an HF export (config.json + *.safetensors) nor a run "
                      f"directory with an hf/ export. Fix: pass <checkpoint.dir> of a finished run")


def eval_data_config(data: str, overrides: list[str], run_dir: Path | None) -> DataConfig:
    """The run's data section (when `run_dir` has one) with `data` as the source, plus overrides."""
    tree: dict = {}
    if run_dir is not None and (run_dir / "config.json").is_file():
        tree = dict(json.loads((run_dir / "config.json").read_text()).get("data", {}))
    tree.update({"source": data, "eval_source": None if data.startswith("builtin:") else data})
    return from_dict(_EvalData, apply_overrides({"data": tree}, overrides, _EvalData)).data


@dataclass
class _EvalData:
    """Lets `--set data.*` overrides go through the same checks as `train`."""

    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class EvalModel:
    """An exported checkpoint served by the HF engine, with its tokenizer's encode/stop ids."""

    hf_dir: Path
    run_dir: Path | None
    tokenizer: Any
    engine: HFEngine
    encode: EncodeFn
    stop_ids: list[int]

    def params(self, max_new_tokens: int) -> SamplingParams:
        """Greedy decoding with this tokenizer's stop tokens."""
        return SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=self.stop_ids)


def load_export_tokenizer(hf_dir: Path) -> Any:
    """The tokenizer saved with an HF export. A plain tokenizers-backed one (the built-in
    tokenizer) is loaded as such: `AutoTokenizer` would pick the model type's class (e.g.
    Qwen2Tokenizer from config.json), whose own pre-tokenizer splits text differently from
    the tokenizer the model was trained with (transformers 5)."""
    cfg_path = hf_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("tokenizer_class") not in _PLAIN_TOKENIZERS or not (hf_dir / "tokenizer.json").is_file():
        return load_tokenizer(hf_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    if tok.pad_token_id is None:
        raise ConfigError(f"{hf_dir}: the tokenizer has no pad token; re-export the checkpoint")
    return tok


_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def check_weight_files(hf_dir: Path) -> None:
    """Every *.safetensors file of `hf_dir` opens (header and size agree), or a CheckpointError
    names the file; transformers' own error names neither the file nor the fix."""
    from safetensors import safe_open

    for path in sorted(hf_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: all mean a damaged file
            raise CheckpointError(f"--checkpoint: {path} is not a readable safetensors file ({e}). Fix: "
                                  "re-export the model (spark-mcore convert mcore-to-hf) or copy it again") from None


def open_model(checkpoint: str) -> EvalModel:
    hf_dir, run_dir = resolve_hf_dir(checkpoint)
    check_weight_files(hf_dir)
    tokenizer = load_export_tokenizer(hf_dir)
    engine = HFEngine.from_pretrained(str(hf_dir), partial(tokenizer.decode, skip_special_tokens=True),
                                      pad_token_id=tokenizer.pad_token_id or 0)
    return EvalModel(hf_dir, run_dir, tokenizer, engine, partial(encode_prompt, tokenizer),
                     stop_token_ids(tokenizer))


def _greedy(model: EvalModel, prompts: list[Prompt], args: argparse.Namespace) -> dict[str, Any]:
    with VerifierPool(RewardConfig()) as pool:
        result = evaluate_accuracy(model.engine, prompts, model.encode, model.stop_ids, pool.score,
                                   EvalConfig(max_new_tokens=args.max_new_tokens, limit=args.limit,
                                              samples=args.samples, temperature=args.temperature,
                                              seed=args.seed))
    sampled = (f"; sampled accuracy={result.sampled_accuracy:.4f} ({result.sampled_n} per prompt, "
               f"temperature {args.temperature})" if result.sampled_accuracy is not None else "")
    print(f"accuracy={result.accuracy:.4f} on {result.num_prompts} prompts ({args.data}, split={args.split}); "
          f"mean response tokens {result.mean_response_tokens:.1f}{sampled}")
    return asdict(result)


def _self_reflect(model: EvalModel, prompts: list[Prompt], args: argparse.Namespace) -> dict[str, Any]:
    chosen = prompts[: args.limit] if args.limit else prompts
    res = self_reflect_eval(model.engine, model.encode, chosen, model.params(args.max_new_tokens),
                            rounds=args.rounds, view=args.view, seed=args.seed)
    print(f"\nself-reflection ({args.rounds} rounds, {args.view} view):\n{self_reflect_table(res)}")
    return self_reflect_dict(res)


def _reward_bench(model: EvalModel, args: argparse.Namespace) -> dict[str, Any]:
    try:
        if args.reward_bench == BUILTIN_ARITH:
            data_cfg = eval_data_config(BUILTIN_ARITH, args.overrides, model.run_dir)
            rows = arith_judge_set(load_prompts(data_cfg, "test"), seed=args.seed, limit=args.limit)
        else:
            rows = load_reward_bench(args.reward_bench, limit=args.limit)
    except ValueError as e:  # bad rows or an empty set: a usage error, reported without a traceback
        raise ConfigError(str(e)) from e
    res = judge_eval(model.engine, model.encode, rows, model.params(args.max_new_tokens), view=args.view,
                     seed=args.seed)
    print(f"\nreward benchmark {args.reward_bench} ({args.view} view):\n{judge_table(res)}")
    return res.to_dict()


def _best_of(model: EvalModel, prompts: list[Prompt], args: argparse.Namespace) -> dict[str, Any]:
    from spark_mcore.data.steps import StepFinder
    from spark_mcore.eval.best_of import JudgeScorer, StepHeadScorer, best_of_eval
    from spark_mcore.models.step_head import load_step_head
    from spark_mcore.spark.judging import verifier_score

    if args.temperature <= 0:
        raise ConfigError(f"--best-of samples N responses: --temperature must be > 0, got {args.temperature}")
    chosen = prompts[: args.limit] if args.limit else prompts
    if args.select == "step-head":
        try:
            head = load_step_head(model.hf_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"--select step-head: {e}") from None
        delimiter, score_last = args.step_delimiter, True
        if model.run_dir is not None and (model.run_dir / "config.json").is_file():
            saved = json.loads((model.run_dir / "config.json").read_text()).get("step_head", {})
            delimiter = delimiter or saved.get("delimiter")
            score_last = bool(saved.get("score_last", True))
        scorer: Any = StepHeadScorer(model.engine.model, head, StepFinder(model.tokenizer, delimiter or ". ", score_last),
                                     pad_id=model.tokenizer.pad_token_id or 0)
    else:
        scorer = JudgeScorer(model.engine.model, model.tokenizer, model.encode, view=args.view, seed=args.seed)
    params = SamplingParams(n=args.best_of, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            stop_token_ids=model.stop_ids, seed=args.seed)
    res = best_of_eval(model.engine, model.encode, chosen, params, verifier_score, scorer, args.select)
    print(f"\nbest-of-{args.best_of} selection ({args.data}, split={args.split}):\n{res.table()}")
    return res.to_dict()


def run_eval(args: argparse.Namespace) -> int:
    if getattr(args, "best_of", 0) < 0:
        raise ConfigError("--best-of must be >= 0 (0 = off)")
    for name in ("limit", "rounds", "max_new_tokens"):
        if getattr(args, name, 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
    if args.out:  # before any work: results must not be lost to an unwritable path at the end
        check_writable_file(args.out, "--out")
    model = open_model(args.checkpoint)
    self_reflect, bench = getattr(args, "self_reflect", False), getattr(args, "reward_bench", None)
    report: dict[str, Any] = {"checkpoint": str(model.hf_dir)}
    if self_reflect or not bench:
        data_cfg = eval_data_config(args.data, args.overrides, model.run_dir)
        prompts = load_prompts(data_cfg, args.split, model.tokenizer, known_tasks=registered_verifiers())
        if getattr(args, "best_of", 0):
            report["best_of"] = _best_of(model, prompts, args)
        elif self_reflect:
            report["self_reflect"] = _self_reflect(model, prompts, args)
        else:
            report["greedy"] = _greedy(model, prompts, args)
    if bench:
        report["reward_bench"] = _reward_bench(model, args)
    if args.out:
        # the plain greedy run keeps its original format (an EvalResult)
        out = report["greedy"] if set(report) == {"checkpoint", "greedy"} else report
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0
