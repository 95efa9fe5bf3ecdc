"""The SPARK-format warm-start mixture: wrong solutions, labels, balance, no label leaks, batches."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.data.arith import arith_problems, solve, worked_solution
from spark_mcore.data.chat import encode_prompt, encode_response
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.data.worked import ERRORS, right_solution, wrong_solution
from spark_mcore.rewards import extract_boxed, get_verifier
from spark_mcore.spark.templates import corpus_texts, get_template
from spark_mcore.spark.text import show_response
from spark_mcore.spark.warmstart_data import KINDS, build_task, judge_sft_examples
from spark_mcore.trainer.config import WarmStartConfig
from spark_mcore.trainer.warmstart import JUDGE_POOL, judge_batches, sft_batches
from spark_mcore.types import Prompt

MATH = get_verifier("math")
JUDGE = get_verifier("judge")
ALL_LEVELS = arith_problems([1, 2, 3, 4], "train", 240, seed=3)


# ---------------------------------------------------------------- wrong solutions
def test_error_kinds_on_37_plus_45_are_exactly_the_expected_texts() -> None:
    right = "7+5=12, carry 1. 3+4+1=8. \\boxed{82}"
    assert right_solution("37+45").text == right
    finals = {ERRORS["final"]("37+45", random.Random(s)).text for s in range(60)}
    assert finals == {f"7+5=12, carry 1. 3+4+1=8. \\boxed{{{v}}}" for v in (83, 81, 84, 80, 92, 72)}
    steps = {ERRORS["step"]("37+45", random.Random(s)).text for s in range(30)}
    assert steps == {"7+5=12, carry 1. 3+4+1=9. \\boxed{92}", "7+5=12, carry 1. 3+4+1=7. \\boxed{72}"}
    operands = {ERRORS["operand"]("37+45", random.Random(s)).text for s in range(60)}
    assert operands == {solve(e)[0] for e in ("36+45", "38+45", "37+44", "37+46")}


def test_step_error_shifts_the_box_by_the_place_of_the_last_step() -> None:
    # one column: 3+4=7 -> 8 or 6 and the box follows; two columns ending in 0: 45-41 -> 1 ten
    assert {ERRORS["step"]("3+4", random.Random(s)).text for s in range(30)} == {
        "3+4=8. \\boxed{8}", "3+4=6. \\boxed{6}"}
    assert ERRORS["step"]("45-41", random.Random(0)).text == "5-1=4. 4-4=1. \\boxed{14}"
    assert ERRORS["step"]("44-44", random.Random(0)) is None  # 0 = 0: ambiguous, left to others


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_kind_contract(name: str) -> None:
    """Every registered error kind: None, or a worked solution whose box holds `value`, a value
    that the math verifier rejects against the right answer."""
    applied = 0
    for i, p in enumerate(ALL_LEVELS):
        worked = ERRORS[name](p.meta["expr"], random.Random(i))
        if worked is None:
            continue
        applied += 1
        assert extract_boxed(worked.text) == str(worked.value)
        assert worked.value != int(p.answer) and worked.value >= 0
        assert MATH(worked.text, p.answer) == 0.0
    assert applied >= 0.9 * len(ALL_LEVELS)


def test_wrong_solution_draws_every_kind_and_is_deterministic() -> None:
    kinds = Counter(wrong_solution(p.meta["expr"], random.Random(i))[1] for i, p in enumerate(ALL_LEVELS))
    assert set(kinds) == set(ERRORS) and min(kinds.values()) > 40
    again = [wrong_solution(p.meta["expr"], random.Random(i))[0] for i, p in enumerate(ALL_LEVELS)]
    assert again == [wrong_solution(p.meta["expr"], random.Random(i))[0] for i, p in enumerate(ALL_LEVELS)]


# ---------------------------------------------------------------- tasks
SOURCES = arith_problems([1, 2], "train", 300, seed=0)
ANSWER_OF = {p.id: p.answer for p in SOURCES}


@pytest.fixture(scope="module")
def examples() -> list[tuple[Prompt, str]]:
    return judge_sft_examples(SOURCES, 600, seed=7)


def test_labels_are_balanced_per_kind(examples: list[tuple[Prompt, str]]) -> None:
    counts = Counter((t.meta["spark_kind"], t.answer if t.task == "judge" else "-") for t, _ in examples)
    assert counts == {("pointwise", "Yes"): 100, ("pointwise", "No"): 100, ("pairwise", "A"): 100,
                      ("pairwise", "B"): 100, ("reflection", "-"): 200}


def test_targets_and_candidates_match_the_labels(examples: list[tuple[Prompt, str]]) -> None:
    for task, target in examples:
        answer = ANSWER_OF[task.meta["source_prompt_id"]]
        right = [MATH(c, answer) for c in task.meta["candidates"]]
        kind = task.meta["spark_kind"]
        if kind == "pointwise":
            assert right == [1.0 if task.answer == "Yes" else 0.0]
        elif kind == "pairwise":
            assert right == ([1.0, 0.0] if task.answer == "A" else [0.0, 1.0])
        else:
            assert right == [0.0] and task.task == "math" and task.answer == answer
        # the target is what the reward accepts: the verdict, or the right worked solution
        verifier = JUDGE if task.task == "judge" else MATH
        assert verifier(target, task.answer) == 1.0
        if kind != "reflection":
            other = {"Yes": "No", "No": "Yes", "A": "B", "B": "A"}[task.answer]
            assert JUDGE(target, other) == 0.0
            assert target == f"\\boxed{{{task.answer}}}"
        # every candidate is shown in the prompt, in the task's view
        for cand in task.meta["candidates"]:
            shown, _ = show_response(cand, task.meta["view"])
            assert shown in task.messages[0]["content"]


def test_the_label_never_shapes_the_prompt_beyond_its_candidates() -> None:
    for i, p in enumerate(arith_problems([1, 2, 3, 4], "train", 40, seed=1)):
        yes, _ = build_task(p, "pointwise", "Yes", random.Random(i))
        no, _ = build_task(p, "pointwise", "No", random.Random(i))
        a, _ = build_task(p, "pairwise", "A", random.Random(i))
        b, _ = build_task(p, "pairwise", "B", random.Random(i))
        for x, y in ((yes, no), (a, b)):
            assert (x.meta["template_id"], x.meta["view"]) == (y.meta["template_id"], y.meta["view"])
        # replacing the shown candidates by placeholders leaves the same text
        assert _blank(yes) == _blank(no)
        assert _blank(a) == _blank(b)
        # verdict words appear only where the template itself names both of them
        for t in (yes, no, a, b):
            empty = get_template(t.meta["template_id"]).text.format(
                noun="", Noun="", question="", candidate="", a="", b="", attempt="")
            for word in ("\\boxed{Yes}", "\\boxed{No}", "\\boxed{A}", "\\boxed{B}", "correct", "wrong"):
                assert t.messages[0]["content"].count(word) == empty.count(word)


def _blank(task: Prompt) -> str:
    """The prompt with each shown candidate replaced by <n>, searching from the end (a short
    answer such as "2" may also occur inside the question)."""
    text, end = task.messages[0]["content"], None
    for n, cand in reversed(list(enumerate(task.meta["candidates"]))):
        shown = show_response(cand, task.meta["view"])[0]
        at = text.rfind(shown, 0, end)
        assert at >= 0
        text, end = text[:at] + f"<{n}>" + text[at + len(shown):], at
    return text


def test_non_arith_prompts_are_rejected_with_the_fix() -> None:
    p = Prompt(id="q1", messages=[{"role": "user", "content": "What is 2+2?"}], answer="4")
    with pytest.raises(ValueError, match=r"meta\['expr'\].*judge_fraction: 0"):
        judge_sft_examples([p], 1, seed=0)
    with pytest.raises(ValueError, match="kinds must be"):
        judge_sft_examples(ALL_LEVELS, 3, seed=0, kinds=["pointwise", "critique"])
    assert KINDS == ("pointwise", "pairwise", "reflection")


# ---------------------------------------------------------------- the mixture
def test_judge_batches_hold_the_fraction_within_one_batch() -> None:
    assert judge_batches(8, 0.25) == [False, True, False, False, False, True, False, False]
    assert judge_batches(3, 0.5) == [True, False, True]  # running totals 1, 1, 2 for 0.5, 1, 1.5
    assert judge_batches(2, 0.25) == [False, True]  # even a 2-step warm start sees one
    assert judge_batches(5, 0.0) == [False] * 5
    assert sum(judge_batches(300, 0.3)) == 90


def test_sft_batches_alternate_solution_and_task_batches_with_the_loss_on_targets_only() -> None:
    tok = build_tokenizer(None, corpus_texts())
    prompts = arith_problems([1], "train", 40, seed=0)
    batches = sft_batches(prompts, tok, lambda p: encode_prompt(tok, p), batch_size=4, seed=0,
                          judge_fraction=0.5, steps=3, judge_examples=judge_sft_examples)
    # the plan [task, solution, task] draws 2 * 4 reward tasks, each used once
    judge_targets = [t for _, t in judge_sft_examples(prompts, 8, seed=0)]
    solutions = {worked_solution(p) for p in prompts}
    seen_judge: list[str] = []
    for j in range(3):
        batch = next(batches)
        assert (set(batch.kinds) <= set(KINDS)) == (j != 1) and (batch.kinds == ["policy"] * 4) == (j == 1)
        for row, mask, kind in zip(batch.tokens.tolist(), batch.loss_mask.tolist(), batch.kinds, strict=True):
            ids = [t for t, m in zip(row, mask, strict=True) if m > 0]
            assert ids[-1] == encode_response(tok, "")[-1]  # the end-of-turn token is learned too
            text = tok.decode(ids[:-1])
            assert text in (solutions if kind == "policy" else judge_targets)
            assert len(ids) < sum(t != (tok.pad_token_id or 0) for t in row)  # the prompt is not in the loss
            seen_judge += [text] if kind != "policy" else []
    assert sorted(seen_judge) == sorted(judge_targets)


def test_a_long_warm_start_builds_at_most_the_pool_of_reward_tasks_and_reuses_them() -> None:
    tok = build_tokenizer(None, corpus_texts())
    prompts = arith_problems([1], "train", 40, seed=0)
    asked: list[int] = []

    def few(source: list, count: int, seed: int) -> list:
        asked.append(count)
        return judge_sft_examples(source, 6, seed)  # a pool smaller than one pass of the plan

    batches = sft_batches(prompts, tok, lambda p: encode_prompt(tok, p), batch_size=4, seed=0,
                          judge_fraction=0.5, steps=10**6, judge_examples=few)
    rows = [next(batches) for _ in range(8)]
    assert asked == [JUDGE_POOL]  # not 0.5 * 10**6 * 4 = 2M examples built before step 1
    targets = [tok.decode(ids) for b in rows if b.kinds[0] != "policy"
               for ids in (r[m > 0][:-1] for r, m in zip(b.tokens, b.loss_mask, strict=True))]
    assert len(targets) == 16 and set(targets) == {t for _, t in judge_sft_examples(prompts, 6, 0)}


def test_judge_fraction_is_validated() -> None:
    assert WarmStartConfig(judge_fraction=0.25).judge_fraction == 0.25
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=r"warmstart.judge_fraction must be in \[0, 1\)"):
            WarmStartConfig(judge_fraction=bad)


class FakeActor:  # loss 1.0 on judge batches, 0.2 on worked solutions; counts its steps
    def __init__(self) -> None:
        from types import SimpleNamespace

        self.pstate = SimpleNamespace(dp_rank=0, dp_size=1)
        self.steps = 0

    def setup_optimizer(self, lr: float, steps: int, warmup: int) -> None:
        pass

    def sft_step(self, batch: object) -> dict[str, float]:
        self.steps += 1
        return {"sft_loss": 0.2 if set(batch.kinds) == {"policy"} else 1.0}  # type: ignore[attr-defined]


def test_the_warm_start_reports_the_loss_of_solution_and_judge_batches_apart() -> None:
    from spark_mcore.trainer.warmstart import warm_start

    tok = build_tokenizer(None, corpus_texts())
    reports: list[str] = []
    cfg = WarmStartConfig(steps=8, batch_size=2, judge_fraction=0.25)
    out = warm_start(FakeActor(), arith_problems([1], "train", 20, seed=0), tok, lambda p: encode_prompt(tok, p),
                     cfg, seed=0, progress=False, judge_examples=judge_sft_examples, report=reports.append)
    assert out["sft_loss_judge"] == pytest.approx(1.0) and out["sft_loss_solution"] == pytest.approx(0.2)
    assert reports == ["warm start step 8/8: loss solution 0.200, judge 1.000"]  # and every 100 steps


def test_a_stop_request_ends_the_warm_start_after_the_current_step() -> None:
    """A stop signal during a long warm start (checkpoint.save_on_signal) must not wait for its
    last step: the loop asks after every step and says how many it did."""
    from spark_mcore.trainer.warmstart import warm_start

    tok = build_tokenizer(None, corpus_texts())
    actor, asked = FakeActor(), []

    def should_stop() -> bool:
        asked.append(actor.steps)
        return actor.steps == 3

    out = warm_start(actor, arith_problems([1], "train", 20, seed=0), tok, lambda p: encode_prompt(tok, p),
                     WarmStartConfig(steps=1000, batch_size=2), seed=0, progress=False, should_stop=should_stop)
    assert actor.steps == 3 and asked == [1, 2, 3] and out["stopped_after"] == 3.0
    actor, asked = FakeActor(), []
    done = warm_start(actor, arith_problems([1], "train", 20, seed=0), tok, lambda p: encode_prompt(tok, p),
                      WarmStartConfig(steps=3, batch_size=2), seed=0, progress=False, should_stop=should_stop)
    assert asked == [1, 2] and "stopped_after" not in done  # after the last step RL's loop asks, and saves
