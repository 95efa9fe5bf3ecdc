"""The policy as its own judge, evaluated: test-time self-reflection and reward-benchmark
(pointwise / pairwise) accuracy, through any rollout engine.

Shared by `spark-mcore eval --self-reflect / --reward-bench` and tools/compare_spark_grpo.py,
so both report the same numbers. The built-in judge set (`arith_judge_set`) pairs each
held-out arith problem's correct worked solution with a wrong one made by the same error
kinds as the warm-start data (`spark_mcore.spark.warmstart_data`), deterministic by seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spark_mcore.data.worked import right_solution, wrong_solution
from spark_mcore.errors import read_utf8
from spark_mcore.eval.reward_bench import (
    HeldOut,
    PairwiseResult,
    PointwiseResult,
    heldout_from_triples,
    pair_row_from_dict,
    pairwise_accuracy,
    point_row_from_dict,
    pointwise_accuracy,
)
from spark_mcore.eval.self_reflect import SelfReflectResult, self_reflect
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.spark.judging import EncodeFn, verifier_score
from spark_mcore.spark.templates import View
from spark_mcore.types import Prompt

BUILTIN_ARITH = "builtin:arith"


# ---------------------------------------------------------------- judge sets
def arith_judge_set(prompts: Sequence[Prompt], seed: int = 0, limit: int = 0) -> HeldOut:
    """Per builtin arith prompt (the first `limit`, 0 = all): one pair row (right vs wrong
    worked solution) and two point rows (right -> Yes, wrong -> No). The wrong solution of a
    prompt depends only on (seed, prompt id)."""
    chosen = list(prompts[:limit] if limit else prompts)
    if not chosen:
        raise ValueError("the judge set is empty: the arith test split has no prompts (data.test_size)")
    triples = []
    for p in chosen:
        expr = p.meta.get("expr")
        if not isinstance(expr, str):
            raise ValueError(f"--reward-bench {BUILTIN_ARITH}: prompt {p.id!r} is not a builtin arith "
                             "prompt; use --data builtin:arith")
        wrong, _ = wrong_solution(expr, random.Random(f"judge-set:{seed}:{p.id}"))
        triples.append((p, right_solution(expr).text, wrong.text))
    return heldout_from_triples(triples)


def load_reward_bench(path: str | Path, limit: int = 0) -> HeldOut:
    """RewardBench-style JSONL: rows with question/chosen/rejected are pairwise rows, rows with
    question/response/label pointwise rows (see spark_mcore.eval.reward_bench)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--reward-bench {p}: no such file (give a JSONL file or {BUILTIN_ARITH})")
    out = HeldOut()
    for n, line in enumerate(read_utf8(p, '--reward-bench', ValueError).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if isinstance(row, dict) and "chosen" not in row and "label" in row:
            out.points.append(point_row_from_dict(row, where))
        else:
            out.pairs.append(pair_row_from_dict(row, where))
    if limit:
        out.pairs, out.points = out.pairs[:limit], out.points[:limit]
    if not out.pairs and not out.points:
        raise ValueError(f"--reward-bench {p}: the file has no rows")
    return out


# ---------------------------------------------------------------- judge accuracy
@dataclass
class JudgeEval:
    """Pairwise (both orders) and pointwise accuracy on one judge set; None = no such rows."""

    pairwise: PairwiseResult | None
    pointwise: PointwiseResult | None

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.pairwise is not None:
            pw = self.pairwise
            out.update({"judge/pairwise_accuracy": pw.accuracy, "judge/pairwise_both_orders": pw.pair_accuracy,
                        "judge/pairwise_a_rate": pw.a_rate, "judge/pairwise_unparsable": pw.unparsable_rate})
        if self.pointwise is not None:
            pt = self.pointwise
            out.update({"judge/pointwise_accuracy": pt.accuracy, "judge/pointwise_unparsable": pt.unparsable_rate})
            for name, value in (("yes", pt.accuracy_yes), ("no", pt.accuracy_no)):
                if value is not None:
                    out[f"judge/pointwise_accuracy_{name}"] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(),
                "pairwise": asdict(self.pairwise) if self.pairwise else None,
                "pointwise": asdict(self.pointwise) if self.pointwise else None}


def judge_eval(engine: RolloutEngine, encode: EncodeFn, rows: HeldOut, params: SamplingParams, *,
               view: View = "cot", seed: int = 0, batch_size: int = 0) -> JudgeEval:
    """Greedy judgements of every pair (in both orders) and every point row of `rows`."""
    kw: dict[str, Any] = {"params": params, "view": view, "seed": seed, "batch_size": batch_size}
    return JudgeEval(
        pairwise=pairwise_accuracy(engine, encode, rows.pairs, **kw) if rows.pairs else None,
        pointwise=pointwise_accuracy(engine, encode, rows.points, **kw) if rows.points else None,
    )


def self_reflect_eval(engine: RolloutEngine, encode: EncodeFn, prompts: Sequence[Prompt],
                      params: SamplingParams, *, rounds: int = 2, view: View = "cot", seed: int = 0,
                      batch_size: int = 0) -> SelfReflectResult:
    """Self-reflection over `prompts`, every response scored by its prompt's verifier."""
    if not prompts:
        raise ValueError("self-reflection needs at least one prompt (check --limit / data.test_size)")
    return self_reflect(engine, encode, prompts, rounds=rounds, params=params, score=verifier_score,
                        view=view, seed=seed, batch_size=batch_size)


# ---------------------------------------------------------------- reporting
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def self_reflect_table(res: SelfReflectResult) -> str:
    """A markdown table of the self-reflection statistics."""
    n = len(res.initial)
    rounds = ", ".join(f"{k}: {v}" for k, v in sorted(res.rounds_histogram.items())) or "-"
    rows = [("prompts", str(n)),
            ("accuracy before reflection (greedy)", _pct(res.accuracy_before)),
            ("accuracy after reflection", _pct(res.accuracy_after)),
            ("judge said No on right answers", _pct(res.reject_rate_on_right)),
            ("judge said No on wrong answers", _pct(res.reject_rate_on_wrong)),
            ("unparsable verdicts", _pct(res.unparsable_rate)),
            ("revisions per prompt (count)", rounds)]
    return _table(("self-reflection", "value"), rows)


def judge_table(res: JudgeEval) -> str:
    """A markdown table of the reward-benchmark accuracies."""
    rows = []
    if res.pairwise is not None:
        pw = res.pairwise
        rows += [("pairwise accuracy (both orders)", f"{_pct(pw.accuracy)} of {2 * pw.num_rows}"),
                 ("pairs right in both orders", _pct(pw.pair_accuracy)),
                 ("share of 'A' verdicts", _pct(pw.a_rate)),
                 ("pairwise unparsable", _pct(pw.unparsable_rate))]
    if res.pointwise is not None:
        pt = res.pointwise
        rows += [("pointwise accuracy", f"{_pct(pt.accuracy)} of {pt.num_rows}"),
                 ("pointwise accuracy on right (Yes)", _pct(pt.accuracy_yes)),
                 ("pointwise accuracy on wrong (No)", _pct(pt.accuracy_no)),
                 ("pointwise unparsable", _pct(pt.unparsable_rate))]
    return _table(("reward benchmark", "value"), rows)


def self_reflect_dict(res: SelfReflectResult) -> dict[str, Any]:
    return {"summary": res.summary(), "num_prompts": len(res.initial),
            "rounds_histogram": {str(k): v for k, v in res.rounds_histogram.items()},
            "initial": res.initial, "responses": res.responses, "verdicts": res.verdicts,
            "rounds_used": res.rounds_used}


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows])


__all__ = ["BUILTIN_ARITH", "JudgeEval", "arith_judge_set", "judge_eval", "judge_table", "load_reward_bench",
           "self_reflect_dict", "self_reflect_eval", "self_reflect_table"]
