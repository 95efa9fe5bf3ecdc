"""GRPO-only vs SPARK from the same warm start, per seed, on a built-in task, on a CPU.

    python tools/compare_spark_grpo.py --task countdown|arith --seeds 0 1 2 --out runs/compare
        [--set key=value ...] [--sft-set key=value ...] [--rl-set key=value ...]
        [--eval-prompts 64] [--samples 8] [--rounds 2] [--reuse]
        [--arms grpo,spark,spro,prefix,spark+spro]   (any combination; default grpo,spark)

Per seed:
  1. warm start once: `spark-mcore train` with trainer.steps=0 (SFT on worked solutions mixed
     with SPARK-format judge tasks, `warmstart.judge_fraction`), exported to <out>/seed<s>/sft/hf;
  2. the warm start answers the held-out prompts: `--samples` responses each at the rollout
     temperature (its avg@n) and one greedy. From its own right and wrong samples (groups with
     both) comes the seed's fixed judge set: one pair (asked in both orders) and two pointwise
     rows (right -> Yes, wrong -> No) per such prompt (`--judge-set synthetic`: right vs
     perturbed worked solutions instead, arith only);
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
export already exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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
MODELS = {"sft": "warm start", "grpo": "GRPO-only", "spark": "SPARK", "spro": "SPRO", "prefix": "Prefix-RFT",
          "spark+spro": "SPARK+SPRO"}
METRICS = {"greedy": "greedy acc", "avg_n": "avg@n acc", "pointwise": "judge pointwise acc",
           "pairwise": "judge pairwise acc (both orders)", "judge": "judge acc (mean of the two)",
           "self_reflect": "acc w/ self-reflection", "sr_delta": "self-reflection change vs greedy"}


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
        proc = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"training run {run_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - start


@dataclass
class EvalSetup:
    """What every evaluation shares: held-out prompts and the decoding settings."""

    prompts: list[Any]
    samples: int
    temperature: float
    max_new_tokens: int
    rounds: int
    judge_set: str
    judge_rows: int


def sampled_groups(model: Any, setup: EvalSetup, seed: int) -> list[Any]:
    """`setup.samples` verified responses per held-out prompt at the rollout temperature."""
    from spark_mcore.rewards import RewardConfig, VerifierPool
    from spark_mcore.rollout.base import SamplingParams
    from spark_mcore.rollout.groups import generate_groups, score_groups

    params = SamplingParams(n=setup.samples, temperature=setup.temperature, max_new_tokens=setup.max_new_tokens,
                            stop_token_ids=model.stop_ids, seed=seed)
    groups = generate_groups(model.engine, setup.prompts, model.encode, params)
    with VerifierPool(RewardConfig()) as pool:
        score_groups(groups, pool.score)
    return groups


def build_judge_set(groups: list[Any], setup: EvalSetup, seed: int, out: Path) -> Any:
    """The seed's fixed judge set, from the warm start's own samples (or synthetic for arith);
    saved as JSONL next to the runs."""
    from spark_mcore.eval.reward_bench import heldout_from_groups, save_jsonl

    if setup.judge_set == "synthetic":
        from spark_mcore.eval.judge_eval import arith_judge_set

        rows = arith_judge_set(setup.prompts, seed=seed, limit=setup.judge_rows)
    else:
        rows = heldout_from_groups(groups, seed=seed, max_rows=setup.judge_rows)
        if not rows.pairs:
            raise RuntimeError("the warm start's samples hold no prompt with both a right and a wrong response, "
                               "so there is no judge set: strengthen the warm start or use --judge-set synthetic")
    save_jsonl(rows.pairs, out / "judge_pairs.jsonl")
    save_jsonl(rows.points, out / "judge_points.jsonl")
    return rows


def evaluate(hf_dir: Path, setup: EvalSetup, seed: int, judge_rows: Any | None, out: Path
             ) -> tuple[dict[str, float], Any]:
    """Every number of the table for one HF export; builds the judge set when `judge_rows` is
    None (the warm start). Returns (metrics, judge rows)."""
    from spark_mcore.eval.cli import open_model
    from spark_mcore.eval.judge_eval import judge_eval, self_reflect_eval

    model = open_model(str(hf_dir))
    try:
        groups = sampled_groups(model, setup, seed)
        rows = judge_rows if judge_rows is not None else build_judge_set(groups, setup, seed, out)
        params = model.params(setup.max_new_tokens)
        sr = self_reflect_eval(model.engine, model.encode, setup.prompts, params, rounds=setup.rounds)
        judge = judge_eval(model.engine, model.encode, rows, params).summary()
    finally:
        model.engine.shutdown()
    rewards = [r.reward for g in groups for r in g.rollouts]
    greedy, after = sr.accuracy_before or 0.0, sr.accuracy_after or 0.0
    pointwise, pairwise = judge["judge/pointwise_accuracy"], judge["judge/pairwise_accuracy"]
    return {"greedy": greedy, "avg_n": sum(rewards) / len(rewards), "pointwise": pointwise,
            "pairwise": pairwise, "judge": (pointwise + pairwise) / 2, "self_reflect": after,
            "sr_delta": after - greedy, "pairwise_both": judge["judge/pairwise_both_orders"],
            "pairwise_a_rate": judge["judge/pairwise_a_rate"],
            "pointwise_yes": judge.get("judge/pointwise_accuracy_yes", float("nan")),
            "pointwise_no": judge.get("judge/pointwise_accuracy_no", float("nan")),
            "judge_unparsable": judge["judge/pointwise_unparsable"],
            "reject_right": _num(sr.reject_rate_on_right), "reject_wrong": _num(sr.reject_rate_on_wrong),
            "judge_rows": float(len(rows.pairs))}, rows


def _num(value: float | None) -> float:
    return float("nan") if value is None else value


def run_seed(seed: int, out: Path, spec: TaskSpec, setup: EvalSetup, args: argparse.Namespace
             ) -> dict[str, dict[str, float]]:
    """Warm start and its evaluation (which fixes the judge set), then each arm and its
    evaluation, for one seed. Override order: the task's
    shared ones, --set, phase defaults, --sft-set / --rl-set, then what defines the phase."""
    seeds = [f"trainer.seed={seed}", f"data.seed={seed}", f"spark.seed={seed}"]
    base = [*spec.shared, *args.extra, *seeds]
    seed_dir = out / f"seed{seed}"
    sft_dir = seed_dir / "sft"
    print(f"seed {seed}: warm start -> {sft_dir}", flush=True)
    times = {"sft": train_run(sft_dir, spec.config, [*base, *spec.warm_start, *args.sft_extra, "trainer.steps=0"],
                              args.reuse)}
    results: dict[str, dict[str, float]] = {}
    rows = None
    start = ["warmstart.steps=0", f"model.hf_path={sft_dir / 'hf'}", f"data.tokenizer={sft_dir / 'tokenizer'}"]
    for name in ["sft"] if args.warm_start_only else ["sft", *args.arms]:
        if name in ARMS:
            print(f"seed {seed}: {name} -> {seed_dir / name}", flush=True)
            times[name] = train_run(seed_dir / name, spec.config,
                                    [*base, *spec.rl, *args.rl_extra, *start, *ARMS[name]], args.reuse)
        t0 = time.perf_counter()
        results[name], rows = evaluate(seed_dir / name / "hf", setup, seed, rows, seed_dir)
        results[name].update(train_s=times[name], eval_s=time.perf_counter() - t0)
        print(f"seed {seed}: {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items()), flush=True)
    return results


# ---------------------------------------------------------------- reporting
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per metric, mean ± std over seeds per model; then a per-seed table."""
    seeds = sorted(per_seed)
    models = {name: label for name, label in MODELS.items() if name in per_seed[seeds[0]]}  # the run's arms
    lines = ["| metric | " + " | ".join(models.values()) + " |", "|---|" + "---|" * len(models)]
    for key, label in [*METRICS.items(), ("train_s", "train wall s")]:
        cells = []
        for name in models:
            m, s = mean_std([per_seed[sd][name][key] for sd in seeds])
            cells.append(f"{m:.0f} ± {s:.0f}" if key == "train_s" else f"{100 * m:+.1f} ± {100 * s:.1f}"
                         if key == "sr_delta" else f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | model | " + " | ".join(METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    for sd in seeds:
        for name, label in models.items():
            lines.append(f"| {sd} | {label} | " + " | ".join(f"{100 * per_seed[sd][name][k]:.1f}" for k in METRICS)
                         + " |")
    return "\n".join(lines)


def checks(per_seed: dict[int, dict[str, dict[str, float]]]) -> list[tuple[str, bool, str]]:
    """The issue's three claims, SPARK against GRPO-only: (claim, holds, numbers); none unless
    both arms ran."""
    seeds = sorted(per_seed)
    if not {"grpo", "spark"} <= set(per_seed[seeds[0]]):
        return []

    def stats(name: str, key: str) -> tuple[float, float]:
        return mean_std([per_seed[s][name][key] for s in seeds])

    out = []
    (js, jss), (jg, jgs) = stats("spark", "judge"), stats("grpo", "judge")
    out.append(("judge acc: SPARK - GRPO > max(std)", js - jg > max(jss, jgs),
                f"{100 * js:.1f} vs {100 * jg:.1f} (std {100 * jss:.1f}, {100 * jgs:.1f})"))
    (ds, _), (dg, _) = stats("spark", "sr_delta"), stats("grpo", "sr_delta")
    out.append(("self-reflection change: SPARK > GRPO", ds > dg, f"{100 * ds:+.1f} vs {100 * dg:+.1f}"))
    (gs, gss), (gg, ggs) = stats("spark", "greedy"), stats("grpo", "greedy")
    out.append(("greedy acc: SPARK >= GRPO - one std", gs >= gg - max(gss, ggs),
                f"{100 * gs:.1f} vs {100 * gg:.1f} (std {100 * gss:.1f}, {100 * ggs:.1f})"))
    return out


def eval_setup(args: argparse.Namespace, spec: TaskSpec) -> EvalSetup:
    """The held-out prompts (data seed 0, the test split, for every seed) and decoding settings,
    read from the task's config with the same overrides as the runs."""
    from spark_mcore.config.run import load_run_config
    from spark_mcore.data.dataset import load_prompts

    cfg = load_run_config(spec.config, [*spec.shared, *args.extra, "data.seed=0",
                                        f"data.test_size={args.eval_prompts}"])
    if args.judge_set == "synthetic" and not cfg.data.source.endswith(":arith"):
        raise SystemExit("--judge-set synthetic needs --task arith (countdown's judge set comes from samples)")
    return EvalSetup(prompts=load_prompts(cfg.data, "test"), samples=args.samples, temperature=cfg.rollout.temperature,
                     max_new_tokens=args.max_new_tokens or cfg.eval.max_new_tokens, rounds=args.rounds,
                     judge_set=args.judge_set, judge_rows=args.judge_rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="countdown")
    p.add_argument("--out", default=None, help="directory for runs and results (default runs/compare_<task>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out test prompts evaluated")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt for avg@n (and the judge set)")
    p.add_argument("--judge-set", choices=["samples", "synthetic"], default="samples")
    p.add_argument("--judge-rows", type=int, default=0, help="at most this many judge pairs (0 = all)")
    p.add_argument("--rounds", type=int, default=2, help="self-reflection rounds")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the config's eval.max_new_tokens")
    p.add_argument("--arms", type=parse_arms, default=parse_arms(DEFAULT_ARMS),
                   help=f"comma-separated arms from {', '.join(ARMS)} (default {DEFAULT_ARMS})")
    p.add_argument("--reuse", action="store_true", help="keep runs that already have an hf/ export")
    p.add_argument("--warm-start-only", action="store_true",
                   help="train and evaluate only the warm start (to tune it), no table")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="train override for every run (e.g. model.hidden_size=64)")
    p.add_argument("--sft-set", dest="sft_extra", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the warm-start runs only (e.g. warmstart.steps=300)")
    p.add_argument("--rl-set", dest="rl_extra", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every RL arm (e.g. trainer.steps=20)")
    args = p.parse_args(argv)
    if not args.seeds or args.eval_prompts < 1 or args.samples < 2 or args.rounds < 0:
        p.error("--seeds needs a seed, --eval-prompts >= 1, --samples >= 2 and --rounds >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = TASKS[args.task]
    start = time.perf_counter()
    out = Path(args.out or f"runs/compare_{args.task}").resolve()
    check_arms(args, spec)
    setup = eval_setup(args, spec)
    per_seed = {s: run_seed(s, out, spec, setup, args) for s in args.seeds}
    if args.warm_start_only:
        return 0
    wall = time.perf_counter() - start
    rows = statistics.fmean(per_seed[s]["sft"]["judge_rows"] for s in per_seed)
    note = (f"\n\n{args.task}: {len(setup.prompts)} held-out prompts; avg@{setup.samples} at temperature "
            f"{setup.temperature}; judge set per seed from the warm start's own "
            f"{'samples' if setup.judge_set == 'samples' else 'synthetic solutions'}: {rows:.0f} pairs on average "
            f"(each asked in both orders) and twice as many pointwise rows; self-reflection {setup.rounds} rounds; "
            f"{len(per_seed)} seeds ({', '.join(map(str, per_seed))}), mean ± std. Total wall time {wall / 60:.1f} min.")
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
                  "max_new_tokens": setup.max_new_tokens, "rounds": setup.rounds, "judge_set": setup.judge_set}},
        indent=2))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
