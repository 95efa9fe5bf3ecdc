"""eval/judge_eval.py against scripted engines, and the `eval` command end to end on a tiny model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from spark_mcore.cli import main
from spark_mcore.data.arith import arith_problems, solve
from spark_mcore.data.chat import encode_prompt
from spark_mcore.data.tokenizer import build_tokenizer
from spark_mcore.eval.cli import open_model
from spark_mcore.eval.judge_eval import (
    arith_judge_set,
    judge_eval,
    judge_table,
    load_reward_bench,
    self_reflect_eval,
    self_reflect_table,
)
from spark_mcore.rewards import get_verifier
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.spark.templates import corpus_texts
from spark_mcore.types import Completion, Prompt

MATH = get_verifier("math")
PROMPTS = arith_problems([1, 2], "test", 4, seed=0)
PARAMS = SamplingParams(max_new_tokens=40, stop_token_ids=[3])
_BOX = re.compile(r"\\boxed\{(\d+)\}")


class ScriptedEngine:
    """Answers each prompt text with `script(text)`; counts generate() calls."""

    policy_version = 0

    def __init__(self, script: Callable[[str], str]) -> None:
        self.script = script
        self.texts: list[str] = []
        self.calls = 0

    def encode(self, prompt: Prompt) -> list[int]:
        self.texts.append(prompt.messages[-1]["content"])
        return [len(self.texts) - 1]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls += 1
        return [[Completion(token_ids=[0], text=self.script(self.texts[ids[0]]))] for ids in prompt_ids]

    def update_weights(self, named_tensors: object, version: int) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


def _value(text: str) -> int:
    return solve(re.search(r"(\d[\d+*-]*)=\?", text).group(1))[1]


def oracle(wrong_first_try: set[str]) -> Callable[[str], str]:
    """A model that judges perfectly and revises correctly; its first solution is wrong (+1)
    for the expressions in `wrong_first_try`."""

    def script(text: str) -> str:
        value, boxes = _value(text), [int(b) for b in _BOX.findall(text)]
        if "\\boxed{A}" in text:  # pairwise: the first boxed number is response A's
            return f"\\boxed{{{'A' if boxes[0] == value else 'B'}}}"
        if "\\boxed{Yes}" in text:  # pointwise
            return f"ok. \\boxed{{{'Yes' if boxes[-1] == value else 'No'}}}"
        if boxes:  # a revision prompt shows the attempt
            return solve(re.search(r"(\d[\d+*-]*)=\?", text).group(1))[0]
        expr = re.search(r"(\d[\d+*-]*)=\?", text).group(1)
        return f"\\boxed{{{value + 1}}}" if expr in wrong_first_try else solve(expr)[0]

    return script


def test_arith_judge_set_pairs_right_and_wrong_solutions_deterministically() -> None:
    rows = arith_judge_set(PROMPTS, seed=0)
    assert len(rows.pairs) == 4 and [r.label for r in rows.points] == ["Yes", "No"] * 4
    for p, pair in zip(PROMPTS, rows.pairs, strict=True):
        assert pair.chosen == solve(p.meta["expr"])[0] and pair.id == p.id
        assert MATH(pair.chosen, p.answer) == 1.0 and MATH(pair.rejected, p.answer) == 0.0
    assert arith_judge_set(PROMPTS, seed=0) == rows
    assert [r.rejected for r in arith_judge_set(PROMPTS, seed=1).pairs] != [r.rejected for r in rows.pairs]
    assert len(arith_judge_set(PROMPTS, seed=0, limit=2).points) == 4
    with pytest.raises(ValueError, match="not a builtin arith prompt"):
        arith_judge_set([Prompt(id="x", messages=[{"role": "user", "content": "hi"}], answer="1")])


def test_judge_eval_perfect_and_position_biased_judges() -> None:
    rows = arith_judge_set(PROMPTS, seed=0)
    engine = ScriptedEngine(oracle(set()))
    res = judge_eval(engine, engine.encode, rows, PARAMS)
    assert res.summary() == {
        "judge/pairwise_accuracy": 1.0, "judge/pairwise_both_orders": 1.0, "judge/pairwise_a_rate": 0.5,
        "judge/pairwise_unparsable": 0.0, "judge/pointwise_accuracy": 1.0, "judge/pointwise_unparsable": 0.0,
        "judge/pointwise_accuracy_yes": 1.0, "judge/pointwise_accuracy_no": 1.0}
    assert engine.calls == 2 and len(engine.texts) == 8 + 8  # 4 pairs x 2 orders, 8 point rows

    lazy = ScriptedEngine(lambda t: "\\boxed{A}" if "\\boxed{A}" in t else "\\boxed{Yes}")
    res = judge_eval(lazy, lazy.encode, rows, PARAMS, view="answer")
    s = res.summary()
    assert (s["judge/pairwise_accuracy"], s["judge/pairwise_both_orders"], s["judge/pairwise_a_rate"]) == (0.5, 0.0, 1.0)
    assert (s["judge/pointwise_accuracy"], s["judge/pointwise_accuracy_yes"], s["judge/pointwise_accuracy_no"]) == (
        0.5, 1.0, 0.0)
    table = judge_table(res)
    assert "| pairwise accuracy (both orders) | 50.0% of 8 |" in table
    assert "| pointwise accuracy on wrong (No) | 0.0% |" in table
    assert res.to_dict()["pointwise"]["num_rows"] == 8


def test_self_reflect_eval_fixes_the_rejected_answers() -> None:
    wrong = {PROMPTS[1].meta["expr"], PROMPTS[3].meta["expr"]}
    engine = ScriptedEngine(oracle(wrong))
    res = self_reflect_eval(engine, engine.encode, PROMPTS, PARAMS, rounds=2)
    assert (res.accuracy_before, res.accuracy_after) == (0.5, 1.0)
    assert (res.reject_rate_on_right, res.reject_rate_on_wrong) == (0.0, 1.0)
    assert res.rounds_used == [0, 1, 0, 1] and res.rounds_histogram == {0: 2, 1: 2}
    # solve 4, judge 4, revise 2, judge the 2 revisions (accepted: no more rounds)
    assert engine.calls == 4
    table = self_reflect_table(res)
    for line in ("| accuracy before reflection (greedy) | 50.0% |", "| accuracy after reflection | 100.0% |",
                 "| judge said No on right answers | 0.0% |", "| judge said No on wrong answers | 100.0% |",
                 "| revisions per prompt (count) | 0: 2, 1: 2 |"):
        assert line in table
    with pytest.raises(ValueError, match="at least one prompt"):
        self_reflect_eval(engine, engine.encode, [], PARAMS)


def test_load_reward_bench_reads_pair_and_point_rows(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    rows = [{"question": "1+1?", "chosen": "\\boxed{2}", "rejected": "\\boxed{3}"},
            {"prompt": "2+2?", "response": "\\boxed{4}", "label": "Yes", "id": "p"},
            {"question": "3+3?", "chosen": "6", "rejected": "7", "id": "q"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    bench = load_reward_bench(path)
    assert [r.chosen for r in bench.pairs] == ["\\boxed{2}", "6"] and [r.label for r in bench.points] == ["Yes"]
    assert len(load_reward_bench(path, limit=1).pairs) == 1
    (tmp_path / "bad.jsonl").write_text('{"question": "x", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'rejected' must be a non-empty string"):
        load_reward_bench(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{nope\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        load_reward_bench(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        load_reward_bench(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf")
    tok = build_tokenizer(out, corpus_texts())
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def test_an_export_is_evaluated_with_the_tokenizer_it_was_trained_with(tiny_hf: Path) -> None:
    # config.json says qwen2, but the saved tokenizer is the built-in one: same ids as training
    trained = build_tokenizer(None, corpus_texts())
    model = open_model(str(tiny_hf))
    for p in PROMPTS:
        assert model.encode(p) == encode_prompt(trained, p)
    assert model.stop_ids == [3, 1] and model.params(7).max_new_tokens == 7


def test_eval_command_self_reflect_and_builtin_reward_bench(tiny_hf: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    rc = main(["eval", "--checkpoint", str(tiny_hf), "--self-reflect", "--rounds", "1", "--reward-bench",
               "builtin:arith", "--limit", "3", "--max-new-tokens", "3", "--set", "data.test_size=5",
               "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) == {"checkpoint", "self_reflect", "reward_bench"}
    assert report["self_reflect"]["num_prompts"] == 3 and len(report["self_reflect"]["verdicts"]) == 3
    assert report["reward_bench"]["pairwise"]["num_rows"] == 3
    assert report["reward_bench"]["pointwise"]["num_rows"] == 6
    printed = capsys.readouterr().out
    assert "| accuracy after reflection |" in printed and "| pairwise accuracy (both orders) |" in printed


def test_eval_command_reports_a_bad_reward_bench_file(tiny_hf: Path, tmp_path: Path, capsys) -> None:
    rc = main(["eval", "--checkpoint", str(tiny_hf), "--reward-bench", str(tmp_path / "none.jsonl")])
    assert rc == 2 and "none.jsonl: no such file" in capsys.readouterr().err
