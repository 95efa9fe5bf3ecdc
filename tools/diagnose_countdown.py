"""Diagnose a countdown warm start as a policy and as a judge (issue 15, round seven).

    python tools/diagnose_countdown.py --model DIR/hf --judge-set DIR/judgeset-KEY \
        [--config examples/configs/compare_countdown_room.yaml] [--set key=value ...] \
        [--samples 8] [--train-prompts 160] [--parts abcde] [--compare-rows 60] [--compare-bound 30] \
        [--out diag.json]

  a. policy errors: `--samples` answers per held-out prompt at the rollout temperature, each
     wrong one classified by cause (`spark_mcore.eval.countdown_errors.answer_error`);
  b. judge checks: greedy pointwise judgements of the judge set's rows, each written check
     compared with the reference check component by component (`check_error`), and whether the
     verdict follows the check the judge wrote (`verdict_follows`);
  c. reward-step verdicts: judge tasks recycled exactly as a SPARK reward step makes them (the
     config's `spark.*`: judge_check, balance, content mode) from the model's own answers on
     `--train-prompts` training prompts, sampled n = rollout.n at the rollout temperature and
     scored like the reward step (`judge_check` verifier, `judge_verdict_accuracy`), split by
     kind and label, with the unparsable and truncated shares, and the same tasks greedy;
  d. reflection tasks: the reflection tasks the recycler makes from the same answers as (c),
     sampled n = rollout.n at the rollout temperature and scored by the source task's verifier
     (as in a reward step), with the share of responses that end in a judge verdict
     (`\\boxed{Yes|No|A|B}`) instead of an answer;
  e. drill comparisons: `--compare-rows` fresh comparison drill rows (`Compare: 27 vs 18, ...`,
     targets up to `--compare-bound`, `data.drill.compare_examples` with a seed that no warm
     start uses), greedy; the share of comparison sentences written exactly as the reference
     check writes them, split by the true outcome, and the share whose digit pairs are right
     but whose word (`same`/`differ`) is wrong. This
     is the skill whose absence made the rebuilt warm start's judge fail (round twelve), and
     what `examples/countdown_warm_start.sh`'s stages ws13a and ws13b drill (round thirteen).
Prints one JSON summary (and writes it to `--out`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _share(counter: Counter, total: int) -> dict[str, float]:
    return {k: round(v / max(total, 1), 3) for k, v in counter.most_common()}


def sample(model: Any, prompts: list[Any], n: int, temperature: float, max_new: int, seed: int) -> list[Any]:
    from spark_mcore.rewards import RewardConfig, VerifierPool
    from spark_mcore.rollout.base import SamplingParams
    from spark_mcore.rollout.groups import generate_groups, score_groups

    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new, stop_token_ids=model.stop_ids,
                            seed=seed)
    groups = generate_groups(model.engine, prompts, model.encode, params)
    with VerifierPool(RewardConfig()) as pool:
        score_groups(groups, pool.score)
    return groups


def policy_errors(groups: list[Any]) -> dict[str, Any]:
    """(a): causes of the wrong answers, and how many RIGHT answers carry a false step."""
    from spark_mcore.eval.countdown_errors import answer_error, step_true, written_steps

    kinds: Counter = Counter()
    right_with_false = right = 0
    for g in groups:
        for r in g.rollouts:
            kind = answer_error(r.completion.text, g.prompt.answer)
            kinds[kind] += 1
            if kind == "right":
                right += 1
                right_with_false += any(not step_true(*s) for s in written_steps(r.completion.text))
    wrong = sum(kinds.values()) - kinds["right"]
    steps = [s for g in groups for r in g.rollouts for s in written_steps(r.completion.text)]
    targets = [json.loads(g.prompt.answer)["target"] for g in groups for r in g.rollouts
               for _ in written_steps(r.completion.text)]
    false_to_target = sum(not step_true(*s) and s[3] == t for s, t in zip(steps, targets, strict=True))
    return {"answers": sum(kinds.values()), "right": kinds["right"],
            "wrong_by_cause": _share(Counter({k: v for k, v in kinds.items() if k != "right"}), wrong),
            "right_with_a_false_step": round(right_with_false / max(right, 1), 3),
            "written_steps": len(steps),
            "written_steps_false": round(sum(not step_true(*s) for s in steps) / max(len(steps), 1), 3),
            "false_steps_claiming_the_target": round(false_to_target / max(sum(not step_true(*s) for s in steps), 1), 3)}


def judge_checks(model: Any, judge_dir: Path, max_new: int) -> dict[str, Any]:
    """(b): greedy pointwise judgements of the judge set, the written check's first wrong part."""
    import random

    from spark_mcore.eval.countdown_errors import check_error, copy_verdict, verdict_follows
    from spark_mcore.eval.judge_set import load_judge_set
    from spark_mcore.rewards.countdown_trace import check_steps
    from spark_mcore.rewards.verifiers import judge_verifier
    from spark_mcore.spark.judging import generate_texts, greedy_params, user_prompt
    from spark_mcore.spark.templates import pick_template, render_pointwise
    from spark_mcore.spark.text import show_response
    from spark_mcore.types import Prompt

    rows = load_judge_set(judge_dir).points
    answers = {}
    prompts = []
    for n, row in enumerate(rows):
        template = pick_template("pointwise", random.Random(f"reward-bench:0:{n}"))
        shown, used = show_response(row.response, "cot") or (row.response, "cot")
        src = Prompt(id=row.id or f"point{n}", messages=[{"role": "user", "content": row.question}], answer="")
        prompts.append(user_prompt(src, "point", render_pointwise(template, row.question, shown, used), "judge"))
        answers[n] = _answer_of(row.question)
    outs = generate_texts(model.engine, model.encode, prompts, greedy_params(model.params(max_new)))
    parts: dict[str, Counter] = {"Yes": Counter(), "No": Counter()}
    follows, right, copy = Counter(), Counter(), Counter()
    for n, (row, out) in enumerate(zip(rows, outs, strict=True)):
        ref, _ = check_steps(row.response, answers[n])
        verdict = next((v for v in ("Yes", "No") if judge_verifier(out, v) > 0.5), None)
        part = check_error(out, ref)
        parts[row.label][part] += 1
        right[(row.label, part, verdict == row.label)] += 1
        follows[str(verdict_follows(out, verdict))] += 1
        trusting = copy_verdict(row.response, answers[n])
        copy["copy_judge_right"] += trusting == row.label
        copy["judge_agrees_with_copy_judge"] += verdict == trusting
    acc_by_part = {f"{lab}/{p}": round(right[(lab, p, True)] / max(c[p], 1), 3) for lab, c in parts.items() for p in c}
    return {"rows": len(rows), "first_wrong_part": {k: _share(v, sum(v.values())) for k, v in parts.items()},
            "verdict_acc_by_first_wrong_part": acc_by_part,
            "verdict_follows_own_check": _share(follows, len(rows)), "copy_judge": _share(copy, len(rows)),
            "examples": [{"response": r.response, "label": r.label, "judge": o} for r, o in list(zip(rows, outs, strict=False))[:6]]}


def _answer_of(question: str) -> str:
    """The countdown answer JSON from a rendered question (`Numbers: 5 1 3. Target: 6.`)."""
    import re

    m = re.search(r"Numbers:\s*([\d ]+)\.\s*Target:\s*(\d+)", question)
    if m is None:
        raise ValueError(f"not a countdown question: {question[:80]!r}")
    return json.dumps({"numbers": [int(x) for x in m.group(1).split()], "target": int(m.group(2))})


def recycled_tasks(groups: list[Any], spark_cfg: Any, per_step: int, reflection: bool = False) -> list[Any]:
    """The judge tasks (or, with `reflection`, the reflection tasks) SPARK's recycler makes from
    `groups`, `per_step` groups per policy step."""
    from spark_mcore.spark.recycler import Recycler

    recycler = Recycler(replace(spark_cfg, enabled=True))
    out = []
    for step, i in enumerate(range(0, len(groups), per_step), start=1):
        out += [s for s in recycler.recycle(groups[i:i + per_step], step) if (s.kind == "reflection") == reflection]
    return out


_VERDICT_END = re.compile(r"\\boxed\{\s*(yes|no|a|b)\s*\}\s*$", re.IGNORECASE)


def reflection_stats(groups: list[Any]) -> dict[str, Any]:
    """(d): reward of sampled reflection responses and the share that end in a judge verdict
    (a model that answers "correct the previous attempt" as a judge task earns 0 every time)."""
    rewards = [r.reward for g in groups for r in g.rollouts]
    verdicts = sum(bool(_VERDICT_END.search(r.completion.text)) for g in groups for r in g.rollouts)
    n = max(len(rewards), 1)
    return {"tasks": len(groups), "responses": len(rewards), "reward_mean": round(sum(rewards) / n, 3),
            "solved_tasks": sum(any(r.reward > 0 for r in g.rollouts) for g in groups),
            "ends_in_verdict": round(verdicts / n, 3)}


def verdict_stats(groups: list[Any], max_new: int) -> dict[str, Any]:
    """(c): reward and verdict accuracy of sampled judge responses, by kind and label."""
    from spark_mcore.eval.countdown_errors import verdict_follows
    from spark_mcore.rewards.boxed import extract_boxed
    from spark_mcore.rewards.judge_check import parse_judge_check_answer, verdict_label
    from spark_mcore.rewards.verifiers import judge_verdict, judge_verifier

    cells: dict[str, list[float]] = {}
    boxes, lengths, total, consistent = Counter(), Counter(), 0, Counter()
    for g in groups:
        label = verdict_label(g.prompt.answer)
        kind = g.prompt.meta.get("spark_kind", "?")
        parsed = parse_judge_check_answer(g.prompt.answer)
        if kind == "pointwise" and parsed is not None:  # a label bug would show here
            consistent[str(verdict_follows(parsed[1], label))] += 1
        choices = ("yes", "no") if kind == "pointwise" else ("a", "b")
        for r in g.rollouts:
            total += 1
            v = judge_verifier(r.completion.text, label)
            for key in ("all", f"{kind}", f"{kind}/{label}"):
                cells.setdefault(key, []).append(v)
            cells.setdefault("reward", []).append(r.reward)
            box = extract_boxed(r.completion.text)
            verdict = None if box is None else judge_verdict(box)
            boxes["none" if box is None else (verdict if verdict in ("yes", "no", "a", "b") else "other")] += 1
            if verdict in choices:
                cells.setdefault("valid_kind", []).append(v)
            lengths[r.completion.finish_reason] += 1
    return {"responses": total, "verdict_acc": {k: round(sum(v) / len(v), 3) for k, v in sorted(cells.items())},
            "n_by_cell": {k: len(v) for k, v in sorted(cells.items())},
            "verdict_box": _share(boxes, total), "finish_reason": _share(lengths, total), "max_new_tokens": max_new,
            "pointwise_label_matches_reference_check": dict(consistent)}


_PROBE_SEED = 12345  # compare_examples' seed for (e); the warm start's drill rows use the run's seeds
_SENTENCE = re.compile(r"\S+ vs \d+:[^.]*\.")


def drill_compare(model: Any, rows: int, bound: int, max_new: int) -> dict[str, Any]:
    """(e): greedy answers to fresh comparison drill rows, sentence by sentence against the reference."""
    from spark_mcore.data.drill import compare_examples
    from spark_mcore.rewards.countdown_trace import compare_text
    from spark_mcore.spark.judging import generate_texts, greedy_params

    examples = compare_examples(rows, _PROBE_SEED, compare_text, bound=bound)
    outs = generate_texts(model.engine, model.encode, [p for p, _ in examples], greedy_params(model.params(max_new)))
    right, total, word_only = Counter(), Counter(), 0
    for (_, ref), out in zip(examples, outs, strict=True):
        wrote = _SENTENCE.findall(out)
        for n, want in enumerate(_SENTENCE.findall(ref)):
            got = wrote[n] if n < len(wrote) else ""
            truth = want.rsplit(" ", 1)[-1].rstrip(".")
            total[truth] += 1
            right[truth] += got == want
            word_only += got != want and got.rsplit(",", 1)[0] == want.rsplit(",", 1)[0]
    count = sum(total.values())
    return {"rows": rows, "bound": bound, "comparisons": count, "right": round(sum(right.values()) / max(count, 1), 3),
            "right_by_truth": {k: round(right[k] / v, 3) for k, v in total.items()},
            "digits_right_word_wrong": round(word_only / max(count, 1), 3),
            "examples": [{"ref": r, "out": o} for (_, r), o in list(zip(examples, outs, strict=True))[:4]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF export directory (…/hf)")
    ap.add_argument("--judge-set", type=Path, help="a judgeset-KEY directory (part b); omitted: b is skipped")
    ap.add_argument("--config", type=Path, default=REPO / "examples/configs/compare_countdown_room.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--train-prompts", type=int, default=160)
    ap.add_argument("--judge-max-new", type=int, default=0, help="max new tokens of judge tasks (0: the config's)")
    ap.add_argument("--compare-rows", type=int, default=60, help="comparison drill rows of part e (3 pairs each)")
    ap.add_argument("--compare-bound", type=int, default=30,
                    help="largest target of part e's pairs (30: countdown's targets; 99: rounds nine-eleven's drill)")
    ap.add_argument("--parts", default="abcd", help="any of a, b, c, d, e (see above)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from spark_mcore.config.run import load_run_config
    from spark_mcore.data.dataset import load_prompts
    from spark_mcore.eval.cli import open_model
    from spark_mcore.eval.judge_set import distinct_prompts

    cfg = load_run_config(args.config, args.set)
    temp, max_new = cfg.rollout.temperature, cfg.rollout.max_new_tokens
    judge_max = args.judge_max_new or max_new
    model = open_model(args.model)
    report: dict[str, Any] = {"model": args.model}
    try:
        if "a" in args.parts:
            test = distinct_prompts(load_prompts(replace(cfg.data, test_size=2048), "test"))
            report["a_policy_errors"] = policy_errors(sample(model, test, args.samples, temp, max_new, 0))
            print(json.dumps(report["a_policy_errors"]), flush=True)
        if "b" in args.parts and args.judge_set:
            report["b_judge_checks"] = judge_checks(model, args.judge_set, judge_max)
            print(json.dumps({k: v for k, v in report["b_judge_checks"].items() if k != "examples"}), flush=True)
        if "c" in args.parts or "d" in args.parts:
            train = load_prompts(cfg.data, "train")[: args.train_prompts]
            groups = sample(model, train, cfg.rollout.n, temp, max_new, 1)
        if "d" in args.parts:
            tasks = [s.prompt for s in recycled_tasks(groups, cfg.spark, cfg.data.prompts_per_step, reflection=True)]
            sampled = sample(model, tasks, cfg.rollout.n, temp, max_new, 3)
            report["d_reflection"] = {**reflection_stats(sampled),
                                      "examples": [r.completion.text for g in sampled[:3] for r in g.rollouts[:2]]}
            print(json.dumps({k: v for k, v in report["d_reflection"].items() if k != "examples"}), flush=True)
        if "c" in args.parts:
            tasks = [s.prompt for s in recycled_tasks(groups, cfg.spark, cfg.data.prompts_per_step)]
            sampled = sample(model, tasks, cfg.rollout.n, temp, judge_max, 2)
            greedy = sample(model, tasks, 1, 0.0, judge_max, 2)
            report["c_reward_step_verdicts"] = {"tasks": len(tasks), "sampled": verdict_stats(sampled, judge_max),
                                                "greedy": verdict_stats(greedy, judge_max),
                                                "examples": [{"prompt": g.prompt.messages[0]["content"][-300:],
                                                              "answer": g.prompt.answer,
                                                              "samples": [r.completion.text for r in g.rollouts[:3]]}
                                                             for g in sampled[:4]]}
            print(json.dumps({k: v for k, v in report["c_reward_step_verdicts"].items() if k != "examples"}), flush=True)
        if "e" in args.parts:
            report["e_drill_compare"] = drill_compare(model, args.compare_rows, args.compare_bound, max_new)
            print(json.dumps({k: v for k, v in report["e_drill_compare"].items() if k != "examples"}), flush=True)
    finally:
        model.engine.shutdown()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
