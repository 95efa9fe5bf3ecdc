"""GRPO-only vs SPARK from the same warm start, per seed, on a built-in task, on a CPU.

    python tools/compare_spark_grpo.py --task countdown|arith --seeds 0 1 2 --out runs/compare
        [--set key=value ...] [--sft-set key=value ...] [--rl-set key=value ...]
        [--config YAML] [--eval-prompts 64] [--samples 8] [--rounds 2] [--reuse]
        [--arms grpo,spark,spro,prefix,spark+spro]   (any combination; default grpo,spark)
        [--shared-warm-start] [--continue-steps N [N ...]] [--own-judge-samples K ...]
        [--eval-prompts 0 (all)] [--per-seed-judge-set] [--rescore]

Per seed:
  1. warm start once: `spark-mcore train` with trainer.steps=0 (SFT on worked solutions mixed
     with SPARK-format judge tasks, `warmstart.judge_fraction`), exported to <out>/seed<s>/sft/hf
     (or one for all seeds, `--shared-warm-start`); `--continue-steps` adds SFT stages from the
     previous export, and `--own-judge-samples K` makes the last stage's judge tasks rows built
     from the previous stage's own K answers per TRAINING prompt (`OwnJudge`);
  2. the warm start answers the held-out prompts (`--eval-prompts`, 0 = all): `--samples`
     responses each at the rollout temperature (its avg@n) and one greedy. From its own right and
     wrong samples (groups with both) comes the fixed judge set: one pair (asked in both orders)
     and two pointwise rows (right -> Yes, wrong -> No) per such prompt (`--judge-set synthetic`:
     right vs perturbed worked solutions instead, arith only). With `--shared-warm-start` it is
     ONE set for every seed and arm, sampled with seed `--warm-start-seed` and built once
     (<out>/judgeset-<key>; `--per-seed-judge-set`: each seed's own, as in rounds 1-5);
  3. each arm of `--arms` starts from that export with the same policy budget (trainer.steps
     policy steps x data.prompts_per_step prompts x rollout.n samples, same seeds) and its own
     config overrides (`ARMS`): grpo (spark.enabled=false), spark (spark.enabled=true; its
     reward steps, trained on the recycled cache, come on top, as in the paper: the budget is
     counted in policy steps and rollouts of policy prompts), spro (algo.advantage=spro),
     prefix (rollout.prefix.enabled=true: Prefix-RFT), spark+spro;
  4. each model (the warm start and every arm) is evaluated with the code of `spark-mcore eval`:
     greedy and avg@n accuracy on the held-out prompts, pointwise and pairwise judge accuracy on
     the seed's judge set, and accuracy after test-time self-reflection (`--rounds`) with its
     change against greedy.
Writes <out>/results.json (every number, per seed, and the configuration) and <out>/results.md
(mean ± std over seeds, then per seed), and prints the table and the issue's checks.
Training runs are subprocesses (logs in their run directories); `--reuse` keeps runs whose HF
export already exists; `--rescore` trains nothing and re-evaluates the exports on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/compare_*.py, run as a script or loaded
from compare_eval import EvalSetup, evaluate, judge_set_dir, sampled_groups, shared_judge_rows  # noqa: E402,F401
from compare_report import METRICS, MODELS, checks, mean_std, table  # noqa: E402,F401  (re-exported for tests)


@dataclass(frozen=True)
class TaskSpec:
    """A task's base config and the overrides of each phase (before the user's)."""

    config: Path
    shared: list[str] = field(default_factory=list)
    warm_start: list[str] = field(default_factory=list)
    rl: list[str] = field(default_factory=list)


# arith keeps the settings its README table was measured with; countdown's live in its YAML.
TASKS: dict[str, TaskSpec] = {
    "arith": TaskSpec(
        REPO / "examples" / "configs" / "tiny_cpu.yaml",
        shared=["model.hidden_size=128", "model.num_layers=2", "model.ffn_hidden_size=384", "data.levels=[1,2]",
                "data.train_size=4000", "eval.max_new_tokens=40", "rollout.max_new_tokens=40",
                "trainer.micro_batch_size=128", "rollout.temperature=1.0"],
        warm_start=["warmstart.steps=450", "warmstart.batch_size=16", "warmstart.lr=0.003",
                    "warmstart.warmup_steps=20", "warmstart.judge_fraction=0.25"],
        rl=["trainer.steps=12", "data.prompts_per_step=16", "rollout.n=8", "trainer.lr=0.0003",
            "trainer.warmup_ratio=0.0"]),
    "countdown": TaskSpec(REPO / "examples" / "configs" / "compare_countdown.yaml"),
}
# The tool evaluates every model itself: the training runs' own evaluations are kept minimal.
RUN_FIXED = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.resume=false",
             "eval.samples=0", "eval.limit=4"]
# --arms: each arm is a set of config overrides on the same warm start, seeds and budget
ARMS: dict[str, list[str]] = {
    "grpo": ["spark.enabled=false"],
    "spark": ["spark.enabled=true"],
    "spro": ["spark.enabled=false", "algo.advantage=spro"],
    "prefix": ["spark.enabled=false", "rollout.prefix.enabled=true"],
    "spark+spro": ["spark.enabled=true", "algo.advantage=spro"],
}
DEFAULT_ARMS = "grpo,spark"
ALL_HELD_OUT = 2048  # `--eval-prompts 0`: every distinct held-out prompt, up to this many


def run_env() -> dict[str, str]:
    """The training runs' environment: one OpenMP thread unless OMP_NUM_THREADS says otherwise.
    On a shared 2-core machine a run with 2 threads took 4-8 s per warm-start step against
    ~1.1 s with one (threads that wait for each other while the other core is busy)."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def parse_arms(text: str) -> list[str]:
    """`--arms grpo,spark,...` -> the arm names in the given order (each once); unknown or
    empty names fail with the list of known arms."""
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}: choose a comma-separated combination of "
                                         f"{', '.join(ARMS)} (e.g. {DEFAULT_ARMS})")
    return list(dict.fromkeys(names))


def check_arms(args: argparse.Namespace, spec: TaskSpec) -> None:
    """Every arm's RL config loads (a bad combination fails before any training)."""
    from spark_mcore.config.run import load_run_config

    for arm in args.arms:
        try:
            load_run_config(spec.config, [*spec.shared, *args.extra, *spec.rl, *args.rl_extra, *ARMS[arm]])
        except Exception as e:  # ConfigError and friends: name the arm
            raise SystemExit(f"--arms {arm}: its config does not load: {e}") from e


def train_run(run_dir: Path, config: Path, overrides: list[str], reuse: bool) -> float:
    """Runs `spark-mcore train` into `run_dir` (log: run_dir/train.log); returns wall seconds."""
    from spark_mcore.distributed.orphans import dies_with_this_process
    if reuse and (run_dir / "hf" / "config.json").is_file():
        print(f"  reusing {run_dir}", flush=True)
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    args = [sys.executable, "-m", "spark_mcore.cli", "train", "--config", str(config)]
    for item in [*overrides, *RUN_FIXED, f"checkpoint.dir={run_dir}"]:
        args += ["--set", item]
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        # a stopped comparison stops its runs too (no orphaned trainers left on the machine)
        proc = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False, env=run_env(),
                              preexec_fn=dies_with_this_process())
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"training run {run_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


@dataclass(frozen=True)
class OwnJudge:
    """`--own-judge-samples`: the last warm-start stage's judge tasks come from the previous
    stage's own answers on training prompts (`spark_mcore.spark.own_judge`)."""

    samples: int = 0  # responses per training prompt at the rollout temperature; 0 = off
    prompts: int = 512  # training prompts sampled
    share: float = 0.5  # warmstart.judge_file_share
    per_group: int = 2  # distinct (right, wrong) pairs per mixed group
    fraction: float = 0.0  # the last stage's warmstart.judge_fraction; 0 = the config's
    rationale: bool = False  # targets write the check before the verdict (countdown_trace)

    def key(self) -> list[Any]:
        return ([self.samples, self.prompts, self.share, self.per_group, *([self.fraction] if self.fraction else []),
                 *(["rationale"] if self.rationale else [])] if self.samples else [])


def own_judge_file(prev_hf: Path, config: Path, overrides: list[str], own: OwnJudge, path: Path,
                   reuse: bool = False) -> Path:
    """Samples the export `prev_hf` on the first `own.prompts` TRAINING prompts (the warm
    start's data config), verifies the answers and saves balanced judge rows from the groups
    with a right and a wrong answer to `path` (kept when it exists and `reuse`)."""
    if reuse and path.is_file():
        print(f"  reusing {path}", flush=True)
        return path
    from spark_mcore.config.run import load_run_config
    from spark_mcore.data.dataset import load_prompts
    from spark_mcore.spark.own_judge import own_judge_rows, save_rows

    cfg = load_run_config(config, overrides)
    prompts = load_prompts(cfg.data, "train")[: own.prompts]
    setup = EvalSetup(prompts, own.samples, cfg.rollout.temperature, cfg.rollout.max_new_tokens, 0, "samples", 0)
    from spark_mcore.eval.cli import open_model

    model = open_model(str(prev_hf))
    try:
        groups = sampled_groups(model, setup, cfg.data.seed)
    finally:
        model.engine.shutdown()
    rows = own_judge_rows(groups, seed=cfg.data.seed, per_group=own.per_group, content_mode=cfg.spark.content_mode,
                          rationale=own.rationale)
    rewards = [r.reward for g in groups for r in g.rollouts]
    mixed = sum(0 < sum(g.rewards) < len(g.rewards) for g in groups)
    print(f"  own judge rows: {len(rows)} from {mixed}/{len(groups)} mixed training groups "
          f"(their sampled accuracy {sum(rewards) / len(rewards):.3f}) -> {path}", flush=True)
    if not rows:
        raise RuntimeError("the warm start's samples on training prompts hold no prompt with both a right and a "
                           "wrong answer: no own judge rows; train longer or drop --own-judge-samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rows(rows, path)
    return path


def warm_start_run(sft_dir: Path, config: Path, overrides: list[str], continue_steps: list[int], reuse: bool,
                   own: OwnJudge = OwnJudge()) -> float:
    """The warm start into `sft_dir`; with `continue_steps` [n1, n2, ...] in stages: the config's
    warm start into <sft_dir>-stage1, then n1 more SFT steps from its export (a fresh lr warmup
    of 5 steps) into <sft_dir>-stage2, ..., the last into `sft_dir`, with stage 1's tokenizer
    copied over. With `own.samples`, the last stage also trains on judge rows from the previous
    stage's own answers on training prompts (<sft_dir>-own_judge.jsonl, `OwnJudge`)."""
    if own.samples and not continue_steps:
        raise SystemExit("--own-judge-samples needs --continue-steps: the rows come from an earlier stage's export")
    if not continue_steps:
        return train_run(sft_dir, config, overrides, reuse)
    dirs = [sft_dir.with_name(f"{sft_dir.name}-stage{i + 1}") for i in range(len(continue_steps))] + [sft_dir]
    first = dirs[0]
    wall = train_run(first, config, overrides, reuse)
    for i, steps in enumerate(continue_steps):
        prev, extra = dirs[i], []
        if own.samples and i == len(continue_steps) - 1:
            t0 = time.perf_counter()
            path = own_judge_file(prev / "hf", config, overrides, own,
                                  sft_dir.with_name(sft_dir.name + "-own_judge.jsonl"), reuse)
            wall += time.perf_counter() - t0
            extra = [f"warmstart.judge_file={path}", f"warmstart.judge_file_share={own.share}",
                     *([f"warmstart.judge_fraction={own.fraction}"] if own.fraction else [])]
        wall += train_run(dirs[i + 1], config, [*overrides, f"model.hf_path={prev / 'hf'}",
                                                f"data.tokenizer={first / 'tokenizer'}", f"warmstart.steps={steps}",
                                                "warmstart.warmup_steps=5", *extra], reuse)
    if not (sft_dir / "tokenizer").is_dir():
        shutil.copytree(first / "tokenizer", sft_dir / "tokenizer")
    return wall



def warm_start_of(seed: int, seed_dir: Path, spec: TaskSpec, args: argparse.Namespace) -> tuple[Path, float]:
    """(directory, train seconds) of the seed's warm start: trained (or reused from disk) or,
    with `--rescore`, only located."""
    if args.shared_warm_start:
        sft_dir, overrides = shared_warm_start(seed_dir.parent, spec, args)
        reuse = True  # cached on disk, keyed by everything that defines it
    else:
        sft_dir, reuse = seed_dir / "sft", args.reuse
        overrides = [*spec.shared, *args.extra, *seed_overrides(seed), *spec.warm_start, *args.sft_extra]
    print(f"seed {seed}: warm start -> {sft_dir}", flush=True)
    if args.rescore:
        return existing_export(sft_dir), 0.0
    return sft_dir, warm_start_run(sft_dir, spec.config, [*overrides, "trainer.steps=0"], args.continue_steps,
                                   reuse, own_judge(args))


def tokenizer_of(run_dir: Path) -> Path:
    """The tokenizer the arms load: the run's own (written when it built one), else its export's
    (a warm start of zero steps from a given model writes no `tokenizer/`, its `hf/` holds one)."""
    own = run_dir / "tokenizer"
    return own if own.is_dir() else run_dir / "hf"


def existing_export(run_dir: Path) -> Path:
    """`run_dir` when it holds an HF export (`--rescore` trains nothing), else a clear exit."""
    if not (run_dir / "hf" / "config.json").is_file():
        raise SystemExit(f"--rescore: {run_dir / 'hf'} holds no export; train that run first (drop --rescore)")
    return run_dir


def seed_overrides(seed: int) -> list[str]:
    return [f"trainer.seed={seed}", f"data.seed={seed}", f"spark.seed={seed}"]


def run_seed(seed: int, out: Path, spec: TaskSpec, setup: EvalSetup, args: argparse.Namespace
             ) -> dict[str, dict[str, float]]:
    """Warm start and its evaluation (which fixes the judge set unless it is shared), then each
    arm and its evaluation, for one seed. Override order: the task's shared ones, --set, phase
    defaults, --sft-set / --rl-set, then what defines the phase. `--rescore` trains nothing:
    it re-evaluates the runs on disk and keeps their recorded train times."""
    seed_dir = out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)  # the judge set lands here before any arm runs
    old_path = seed_dir / "seed_results.json"
    old = json.loads(old_path.read_text()) if args.rescore and old_path.is_file() else {}
    if old and not (backup := seed_dir / "seed_results.before_rescore.json").is_file():
        backup.write_text(json.dumps(old, indent=2))  # the first numbers stay on disk
    sft_dir, wall = warm_start_of(seed, seed_dir, spec, args)
    times = {"sft": old.get("sft", {}).get("train_s", wall)}
    rows = shared_judge_rows(out, sft_dir, setup, args.warm_start_seed) if args.shared_judge_set else None
    results: dict[str, dict[str, float]] = {}
    start = ["warmstart.steps=0", f"model.hf_path={sft_dir / 'hf'}", f"data.tokenizer={tokenizer_of(sft_dir)}"]
    base = [*spec.shared, *args.extra, *seed_overrides(seed)]
    for name in ["sft"] if args.warm_start_only else ["sft", *args.arms]:
        if name in ARMS and args.rescore:
            times[name] = old.get(name, {}).get("train_s", 0.0)
            existing_export(seed_dir / name)
        elif name in ARMS:
            print(f"seed {seed}: {name} -> {seed_dir / name}", flush=True)
            times[name] = train_run(seed_dir / name, spec.config,
                                    [*base, *spec.rl, *args.rl_extra, *start, *ARMS[name]], args.reuse)
        t0 = time.perf_counter()
        hf = sft_dir / "hf" if name == "sft" else seed_dir / name / "hf"
        results[name], rows = evaluate(hf, setup, seed, rows, seed_dir)
        results[name].update(train_s=times[name], eval_s=time.perf_counter() - t0)
        print(f"seed {seed}: {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items()), flush=True)
        old_path.write_text(json.dumps(results, indent=2))
    return results


def load_seed(out: Path, seed: int, arms: list[str]) -> dict[str, dict[str, float]]:
    """A finished seed's numbers (`--report-only`: seeds run as separate, parallel processes)."""
    path = out / f"seed{seed}" / "seed_results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    missing = sorted({"sft", *arms} - set(results))
    if missing:
        raise SystemExit(f"--report-only: {path} lacks {missing}; run that seed first")
    return {name: results[name] for name in ["sft", *arms]}


def shared_warm_start(out: Path, spec: TaskSpec, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """(directory, overrides) of the one warm start every seed starts from (`--shared-warm-start`):
    trained with seed `args.warm_start_seed`, in <out>/warmstart-<key>, the key a hash of the
    task config's text and every override that reaches the warm start, so a changed
    configuration trains a new one and an unchanged one is reused from disk."""
    ws_seed = args.warm_start_seed
    overrides = [*spec.shared, *args.extra, f"trainer.seed={ws_seed}", f"data.seed={ws_seed}",
                 f"spark.seed={ws_seed}", *spec.warm_start, *args.sft_extra]
    # one continue stage keys as the int it was before stages could be chained (caches stay valid)
    cont: Any = args.continue_steps[0] if len(args.continue_steps) == 1 else (args.continue_steps or 0)
    key = hashlib.sha256(json.dumps([spec.config.read_text(), overrides, cont, *own_judge(args).key()]).encode()
                         ).hexdigest()[:12]
    return out / f"warmstart-{key}", overrides


def eval_setup(args: argparse.Namespace, spec: TaskSpec) -> EvalSetup:
    """The held-out prompts (data seed 0, the test split, for every seed) and decoding settings,
    read from the task's config with the same overrides as the runs."""
    from spark_mcore.config.run import load_run_config
    from spark_mcore.data.dataset import load_prompts
    from spark_mcore.eval.judge_set import distinct_prompts

    size = args.eval_prompts or ALL_HELD_OUT
    cfg = load_run_config(spec.config, [*spec.shared, *args.extra, "data.seed=0", f"data.test_size={size}"])
    if args.judge_set == "synthetic" and not cfg.data.source.endswith(":arith"):
        raise SystemExit("--judge-set synthetic needs --task arith (countdown's judge set comes from samples)")
    prompts = load_prompts(cfg.data, "test")
    if not args.eval_prompts:  # all: the split's pool, cut where it starts repeating
        prompts = distinct_prompts(prompts)
    return EvalSetup(prompts=prompts, samples=args.samples, temperature=cfg.rollout.temperature,
                     max_new_tokens=args.max_new_tokens or cfg.eval.max_new_tokens, rounds=args.rounds,
                     judge_set=args.judge_set, judge_rows=args.judge_rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="countdown")
    p.add_argument("--out", default=None, help="directory for runs and results (default runs/compare_<task>)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the runs' base config instead of the task's (e.g. examples/configs/compare_countdown_check.yaml"
                        "); its text is part of the shared warm start's cache key")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-prompts", type=int, default=64,
                   help=f"held-out test prompts evaluated (0 = every distinct one, at most {ALL_HELD_OUT})")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt for avg@n (and the judge set)")
    p.add_argument("--judge-set", choices=["samples", "synthetic"], default="samples")
    p.add_argument("--judge-rows", type=int, default=0, help="at most this many judge pairs (0 = all)")
    p.add_argument("--rounds", type=int, default=2, help="self-reflection rounds")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the config's eval.max_new_tokens")
    p.add_argument("--arms", type=parse_arms, default=parse_arms(DEFAULT_ARMS),
                   help=f"comma-separated arms from {', '.join(ARMS)} (default {DEFAULT_ARMS})")
    p.add_argument("--reuse", action="store_true", help="keep runs that already have an hf/ export")
    p.add_argument("--shared-warm-start", action="store_true",
                   help="one warm start (seed --warm-start-seed) for every seed, cached on disk by its config")
    p.add_argument("--warm-start-seed", type=int, default=0,
                   help="the shared warm start's training seed, and the sampling seed of the shared judge set")
    p.add_argument("--per-seed-judge-set", action="store_true",
                   help="with --shared-warm-start: each seed builds its own judge set from the warm start's samples "
                        "with its own sampling seed (rounds 1-5 in docs/spark_in_miniature.md) instead of the one shared set")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: re-evaluate every seed's existing exports (warm start and arms) and rewrite "
                        "its seed_results.json, keeping the recorded train times (first numbers kept in "
                        "seed_results.before_rescore.json)")
    p.add_argument("--continue-steps", type=int, nargs="*", default=[], metavar="N",
                   help="continue the warm start in further runs, each N SFT steps from the previous export "
                        "(e.g. 400 600: three stages)")
    p.add_argument("--own-judge-samples", type=int, default=0, metavar="K",
                   help="the last warm-start stage also trains on judge rows from the previous stage's own K "
                        "answers per training prompt (needs --continue-steps; 0 = off)")
    p.add_argument("--own-judge-prompts", type=int, default=512, help="training prompts sampled for those rows")
    p.add_argument("--own-judge-share", type=float, default=0.5,
                   help="share of the last stage's judge-batch examples that are own rows (the rest synthetic)")
    p.add_argument("--own-judge-per-group", type=int, default=2,
                   help="distinct (right, wrong) answer pairs used per training prompt")
    p.add_argument("--own-judge-rationale", action="store_true",
                   help="own judge targets write the check before the verdict (countdown only: evaluate the box "
                        "step by step, its numbers vs the given ones, value vs target, then the verdict)")
    p.add_argument("--own-judge-fraction", type=float, default=0.0,
                   help="the last stage's warmstart.judge_fraction (0 = the config's)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table from <out>/seed<s>/seed_results.json of earlier runs "
                        "(e.g. one process per seed, run in parallel)")
    p.add_argument("--warm-start-only", action="store_true",
                   help="train and evaluate only the warm start (to tune it), no table")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="train override for every run (e.g. model.hidden_size=64)")
    p.add_argument("--sft-set", dest="sft_extra", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the warm-start runs only (e.g. warmstart.steps=300)")
    p.add_argument("--rl-set", dest="rl_extra", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every RL arm (e.g. trainer.steps=20)")
    args = p.parse_args(argv)
    if not args.seeds or args.eval_prompts < 0 or args.samples < 2 or args.rounds < 0:
        p.error("--seeds needs a seed, --eval-prompts >= 0 (0 = all), --samples >= 2 and --rounds >= 0")
    if args.rescore and (args.report_only or args.warm_start_only):
        p.error("--rescore re-evaluates finished runs: not with --report-only or --warm-start-only")
    # one judge set for every seed and arm whenever they share the warm start it is built from
    args.shared_judge_set = args.shared_warm_start and not args.per_seed_judge_set
    args.continue_steps = [n for n in args.continue_steps if n]  # `--continue-steps 0`: none, as before
    if args.config is not None and not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    if any(n < 0 for n in args.continue_steps):
        p.error("--continue-steps takes positive step counts")
    if args.own_judge_samples and (args.own_judge_samples < 2 or not args.continue_steps
                                   or args.own_judge_prompts < 1 or not 0 <= args.own_judge_share <= 1
                                   or args.own_judge_per_group < 1 or not 0 <= args.own_judge_fraction < 1):
        p.error("--own-judge-samples needs K >= 2 and --continue-steps N (the rows come from the stage before "
                "the last), --own-judge-prompts >= 1, --own-judge-share in [0, 1], --own-judge-per-group >= 1")
    return args


def task_spec(args: argparse.Namespace) -> TaskSpec:
    """The task's spec, with `--config` as its base config when given."""
    spec = TASKS[args.task]
    return spec if args.config is None else dataclasses.replace(spec, config=Path(args.config).resolve())


def own_judge(args: argparse.Namespace) -> OwnJudge:
    return OwnJudge(args.own_judge_samples, args.own_judge_prompts, args.own_judge_share, args.own_judge_per_group,
                    args.own_judge_fraction, args.own_judge_rationale)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = task_spec(args)
    start = time.perf_counter()
    out = Path(args.out or f"runs/compare_{args.task}").resolve()
    check_arms(args, spec)
    import torch  # the evaluations run here: the same thread rule as the training runs (run_env)

    torch.set_num_threads(int(run_env()["OMP_NUM_THREADS"]))
    setup = eval_setup(args, spec)
    if args.report_only:
        per_seed = {s: load_seed(out, s, args.arms) for s in args.seeds}
    else:
        per_seed = {s: run_seed(s, out, spec, setup, args) for s in args.seeds}
    if args.warm_start_only:
        return 0
    wall = time.perf_counter() - start
    if args.report_only:  # the seeds ran elsewhere: their runs' wall times, summed
        wall = sum(r.get("train_s", 0.0) + r.get("eval_s", 0.0) for sd in per_seed.values() for r in sd.values())
    rows = statistics.fmean(per_seed[s]["sft"]["judge_rows"] for s in per_seed)
    note = (f"\n\n{args.task}: {len(setup.prompts)} held-out prompts; avg@{setup.samples} at temperature "
            f"{setup.temperature}; judge set {'shared by every seed and arm' if args.shared_judge_set else 'per seed'} "
            f"from the warm start's own "
            f"{'samples' if setup.judge_set == 'samples' else 'synthetic solutions'}: {rows:.0f} pairs on average "
            f"(each asked in both orders) and twice as many pointwise rows; self-reflection {setup.rounds} rounds; "
            f"{len(per_seed)} seeds ({', '.join(map(str, per_seed))}), mean ± std. "
            f"{'Sum of the runs' if args.report_only else 'Total'} wall time {wall / 60:.1f} min.")
    verdicts = checks(per_seed)
    check_md = "\n".join(f"- {'yes' if ok else 'NO'}: {claim} ({nums})" for claim, ok, nums in verdicts)
    md = table(per_seed) + note + ("\n\nThe issue's checks (SPARK vs GRPO-only):\n" + check_md if verdicts else "") + "\n"
    print("\n" + md)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(
        {"task": args.task, "arms": {a: ARMS[a] for a in args.arms}, "wall_s": wall, "per_seed": per_seed,
         "checks": verdicts,
         "config": str(spec.config), "shared": spec.shared, "warm_start": spec.warm_start, "rl": spec.rl,
         "extra": args.extra, "sft_extra": args.sft_extra, "rl_extra": args.rl_extra,
         "eval": {"prompts": len(setup.prompts), "samples": setup.samples, "temperature": setup.temperature,
                  "max_new_tokens": setup.max_new_tokens, "rounds": setup.rounds, "judge_set": setup.judge_set,
                  "shared_judge_set": args.shared_judge_set}},
        indent=2))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
