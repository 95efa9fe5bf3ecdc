"""Round seven of issue 15: the arithmetic drill rows of the warm start and the error classifiers."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.arith import arith_problems
from spark_mcore.data.chat import encode_prompt
from spark_mcore.data.drill import compare_examples, compare_pairs, drill_examples, drill_facts
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.eval.countdown_errors import (
    answer_error,
    check_error,
    copy_verdict,
    split_check,
    verdict_follows,
    written_steps,
)
from spark_mcore.rewards.countdown_trace import check_steps, compare_text
from spark_mcore.spark.templates import corpus_texts
from spark_mcore.trainer.config import WarmStartConfig
from spark_mcore.trainer.warmstart import sft_batches

ANS = '{"numbers": [9, 4, 5], "target": 25}'


def test_drill_facts_are_true_in_range_and_cover_the_level() -> None:
    facts = drill_facts(30, 9)
    assert len(facts) == len(set(facts)) == 797
    for a, op, b, c in facts:
        exact = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b)}[op]
        assert exact == c and 0 <= c <= 30 and (a <= 9 or b <= 9)
    for fact in ((4, "*", 7, 28), (13, "-", 9, 4), (27, "/", 9, 3), (9, "+", 21, 30)):
        assert fact in facts
    assert (4, "*", 8, 32) not in facts and (7, "/", 2, 3) not in facts


def test_drill_rows_ask_for_the_facts_they_answer_and_are_deterministic() -> None:
    rows = drill_examples(50, seed=3)
    assert rows == drill_examples(50, seed=3) and rows != drill_examples(50, seed=4)
    prompt, target = rows[0]
    asked = prompt.messages[0]["content"].removeprefix("Compute: ").rstrip(".").split(", ")
    assert [s.split("=")[0] for s in target.rstrip(".").split(". ")] == asked
    facts = set(drill_facts())
    assert all(s in facts for _, t in rows for s in written_steps(t))


def test_drill_share_replaces_that_share_of_solution_rows() -> None:
    tok = build_tokenizer(None, corpus_texts())
    prompts = arith_problems([1], "train", 40, seed=0)
    batches = sft_batches(prompts, tok, lambda p: encode_prompt(tok, p), batch_size=50, seed=0,
                          drill_share=0.4)
    drill_ids = encode_prompt(tok, drill_examples(1, 0)[0][0])[:6]  # the chat prefix + "Compute"
    rows = [r for _ in range(4) for r in next(batches).tokens.tolist()]
    share = sum(r[:6] == drill_ids for r in rows) / len(rows)
    assert 0.3 < share < 0.5
    with pytest.raises(ConfigError, match="drill_share"):
        WarmStartConfig(drill_share=1.0)
    assert WarmStartConfig(drill_share=0.3).drill_bound == 30


def test_compare_drill_rows_write_the_checks_comparison() -> None:
    import random

    pairs = compare_pairs(400, random.Random(0))
    same = sum(v == t for v, t in pairs) / len(pairs)
    near = sum(v != t and len(str(v)) == len(str(t)) and sum(a != b for a, b in zip(str(v), str(t), strict=True)) == 1
               for v, t in pairs) / len(pairs)
    assert 0.4 < same < 0.65 and near > 0.2 and all(1 <= t <= 99 and 0 <= v <= 99 for v, t in pairs)
    rows = compare_examples(20, seed=1, writer=compare_text)
    assert rows == compare_examples(20, seed=1, writer=compare_text)
    prompt, target = rows[0]
    asked = prompt.messages[0]["content"].removeprefix("Compare: ").rstrip(".").split(", ")
    assert target == " ".join(compare_text(Fraction(int(a.split(" vs ")[0])), int(a.split(" vs ")[1])) for a in asked)


def test_drill_compare_mixes_comparison_rows_into_the_drill() -> None:
    tok = build_tokenizer(None, corpus_texts())
    prompts = arith_problems([1], "train", 40, seed=0)
    batches = sft_batches(prompts, tok, lambda p: encode_prompt(tok, p), batch_size=50, seed=0,
                          drill_share=0.5, drill_compare=0.5)
    compare_ids = encode_prompt(tok, compare_examples(1, 0, compare_text)[0][0])[:6]  # the prefix + "Compare"
    rows = [r for _ in range(4) for r in next(batches).tokens.tolist()]
    assert 0.15 < sum(r[:6] == compare_ids for r in rows) / len(rows) < 0.35
    with pytest.raises(ConfigError, match="drill_compare"):
        WarmStartConfig(drill_compare=0.5)  # needs drill_share
    assert WarmStartConfig(drill_share=0.3, drill_compare=0.5).drill_compare == 0.5


def test_drill_compare_bound_sets_the_range_of_the_comparison_rows() -> None:
    tok = build_tokenizer(None, corpus_texts())
    prompts = arith_problems([1], "train", 40, seed=0)

    def compared(**kw: int) -> list[tuple[int, int]]:
        batches = sft_batches(prompts, tok, lambda p: encode_prompt(tok, p), batch_size=50, seed=0,
                              drill_share=0.9, drill_compare=1.0, **kw)
        texts = [tok.decode(r, skip_special_tokens=True) for _ in range(4) for r in next(batches).tokens.tolist()]
        return [(int(v), int(t)) for text in texts for v, t in re.findall(r"(\d+) vs (\d+):", text)]

    assert max(t for _, t in compared()) > 30  # the default keeps rounds nine-eleven's 1..99
    small = compared(compare_bound=30)
    assert len(small) > 100 and max(t for _, t in small) <= 30  # (a near miss may change a digit to 9)
    assert sum(t < 10 for _, t in small) / len(small) > 0.2  # one-digit targets, as countdown's checks have
    with pytest.raises(ConfigError, match="drill_compare_bound"):
        WarmStartConfig(drill_share=0.3, drill_compare=0.5, drill_compare_bound=0)


def test_answer_error_names_the_first_cause() -> None:
    assert answer_error("9-4=5. 5*5=25. \\boxed{(9-4)*5}", ANS) == "right"
    assert answer_error("9-4=6. 6*5=25. \\boxed{(9-4)*5}", ANS) == "right"  # the box decides
    assert answer_error("no box", ANS) == "unparseable"
    assert answer_error("\\boxed{9^2}", ANS) == "unparseable"
    assert answer_error("9+7=16. \\boxed{9+7}", ANS) == "foreign_number"
    assert answer_error("9+9=18. \\boxed{9+9}", ANS) == "foreign_number"
    assert answer_error("9+4=15. \\boxed{9+4}", ANS) == "false_step"
    assert answer_error("9+4=13. \\boxed{9+5}", ANS) == "box_mismatch"
    assert answer_error("9+4=13. \\boxed{9+4}", ANS) == "misses_target"


def test_check_components_and_the_trusting_judge() -> None:
    ref, _ = check_steps("9+4=15. \\boxed{9+4}", ANS)  # "9+4=13. uses 9 4; given 9 4 5. 13 vs 25: 1 vs 2, differ."
    assert split_check(ref)["compare"] == ["13 vs 25: 1 vs 2, differ."]
    assert check_error(ref + " \\boxed{No}", ref) == "none"
    assert check_error(ref.replace("9+4=13", "9+4=15"), ref) == "steps"
    assert check_error(ref.replace("given 9 4 5", "given 9 4 4"), ref) == "numbers"
    assert check_error(ref.replace("13 vs 25", "13 vs 26"), ref) == "compare"
    assert verdict_follows(ref + " \\boxed{No}", "No") and not verdict_follows(ref, "Yes")
    assert verdict_follows("uses 9; given 9. 7 not given. 25 vs 25: same.", "no")  # a broken rule -> No
    assert verdict_follows("uses 9 4; given 9 4 5. 27 vs 18: 2 vs 1, differ.", "No")  # digit-wise format
    assert verdict_follows("uses 9 4; given 9 4 5. 27 vs 18: 2 vs 2, same.", "Yes")
    assert verdict_follows("no comparison", "Yes") is None
    assert copy_verdict("9+4=25. \\boxed{9+4}", ANS) == "Yes"  # trusts the false step
    assert copy_verdict("9-4=5. 5*5=25. \\boxed{(9-4)*5}", ANS) == "Yes"
    assert copy_verdict("\\boxed{9+4}", ANS) == "No"


def test_warmstart_judge_kinds_selects_the_synthetic_reward_tasks() -> None:
    assert WarmStartConfig().judge_kinds == ["pointwise", "pairwise", "reflection"]
    assert WarmStartConfig(judge_kinds=["reflection"]).judge_kinds == ["reflection"]
    for bad in ([], ["reflect"], ["pointwise", "judge"]):
        with pytest.raises(ConfigError, match="warmstart.judge_kinds"):
            WarmStartConfig(judge_kinds=bad)
