"""Held-out evaluation: greedy accuracy, sampled accuracy (avg@k), config checks, result files."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_mcore.config.loader import ConfigError
from spark_mcore.eval.config import EvalConfig
from spark_mcore.eval.runner import EvalResult, evaluate_accuracy
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.types import Completion, Prompt


class CountingEngine:
    """Greedy answers are always right; the j-th sample of a prompt is right iff j % 4 == 0
    (so avg@4 = 0.25). Records the sampling parameters it was called with."""

    policy_version = 0

    def __init__(self) -> None:
        self.calls: list[SamplingParams] = []

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append(params)
        out = []
        for ids in prompt_ids:
            answer = str(ids[0])
            texts = [answer if params.temperature == 0 or j % 4 == 0 else "wrong" for j in range(params.n)]
            out.append([Completion(token_ids=[1, 2], text=t) for t in texts])
        return out


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": "q"}], answer=str(i)) for i in range(n)]


def _score(triples: list[tuple[str, str, str]]) -> list[float]:
    return [float(response == answer) for _, response, answer in triples]


def _encode(prompt: Prompt) -> list[int]:
    return [int(prompt.answer)]


def test_greedy_only_by_default() -> None:
    engine = CountingEngine()
    res = evaluate_accuracy(engine, _prompts(6), _encode, [0], _score, EvalConfig(max_new_tokens=8))
    assert res.accuracy == 1.0 and res.num_prompts == 6
    assert res.sampled_accuracy is None and res.sampled_n == 0
    assert [c.temperature for c in engine.calls] == [0.0]
    assert "sampled" not in res.summary()


def test_sampled_accuracy_is_mean_over_samples() -> None:
    engine = CountingEngine()
    cfg = EvalConfig(max_new_tokens=8, samples=4, temperature=0.7, seed=3, limit=5)
    res = evaluate_accuracy(engine, _prompts(9), _encode, [0], _score, cfg)
    assert res.num_prompts == 5 and res.accuracy == 1.0
    assert res.sampled_accuracy == pytest.approx(0.25) and res.sampled_n == 4
    sampled = engine.calls[1]
    assert (sampled.n, sampled.temperature, sampled.seed) == (4, 0.7, 3)
    assert "0.250 sampled (4/prompt)" in res.summary()


def test_result_round_trip_and_old_files(tmp_path: Path) -> None:
    res = EvalResult(accuracy=0.5, num_prompts=2, mean_response_tokens=3.0, truncated_fraction=0.0,
                     sampled_accuracy=0.25, sampled_n=4)
    res.write(tmp_path / "r.json")
    assert EvalResult.read(tmp_path / "r.json") == res
    # files written before sampled accuracy existed still load
    (tmp_path / "old.json").write_text('{"accuracy": 1.0, "num_prompts": 1, "mean_response_tokens": 2.0, '
                                       '"truncated_fraction": 0.0, "samples": []}')
    assert EvalResult.read(tmp_path / "old.json").sampled_accuracy is None


@pytest.mark.parametrize("kwargs", [{"samples": -1}, {"samples": 2, "temperature": 0.0}, {"max_new_tokens": 0}])
def test_bad_config_names_the_field(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="eval\\."):
        EvalConfig(**kwargs)  # type: ignore[arg-type]


def test_empty_prompt_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="evaluation set is empty"):
        evaluate_accuracy(CountingEngine(), [], _encode, [0], _score, EvalConfig())
