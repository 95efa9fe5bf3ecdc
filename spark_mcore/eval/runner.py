"""Held-out accuracy of a policy served by any rollout engine: greedy, and optionally the mean
accuracy of k samples per prompt."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from spark_mcore.eval.config import EvalConfig
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.rollout.groups import generate_groups, score_groups
from spark_mcore.types import Prompt, RolloutGroup


@dataclass
class EvalResult:
    accuracy: float
    num_prompts: int
    mean_response_tokens: float
    truncated_fraction: float
    samples: list[dict[str, object]] = field(default_factory=list)
    sampled_accuracy: float | None = None  # mean reward of `sampled_n` samples per prompt
    sampled_n: int = 0

    @classmethod
    def read(cls, path: str | Path) -> EvalResult:
        return cls(**json.loads(Path(path).read_text()))

    def summary(self) -> str:
        text = f"{self.accuracy:.3f} greedy ({self.num_prompts} prompts)"
        if self.sampled_accuracy is not None:
            text += f", {self.sampled_accuracy:.3f} sampled ({self.sampled_n}/prompt)"
        return text

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2))


Producer = Callable[[list[Prompt], SamplingParams], list[RolloutGroup]]


def evaluate_accuracy(engine: RolloutEngine | None, prompts: list[Prompt], encode: Callable[[Prompt], list[int]],
                      stop_ids: list[int], score: Callable[[list[tuple[str, str, str]]], list[float]],
                      cfg: EvalConfig, produce: Producer | None = None) -> EvalResult:
    """Greedy-decodes every prompt once and scores it with the prompt's verifier.

    `produce(prompts, params)` -> verified groups replaces generating on `engine` and scoring
    with `score` (the training loop passes one that divides the prompts over DP replicas)."""
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise ValueError("evaluation set is empty: check data.eval_source / data.test_size")
    if produce is None:
        produce = partial(_generate_and_score, engine, encode, score)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids)
    rollouts = [g.rollouts[0] for g in produce(prompts, params)]
    n = len(rollouts)
    sampled = _sampled_accuracy(produce, prompts, stop_ids, cfg) if cfg.samples else None
    return EvalResult(
        sampled_accuracy=sampled, sampled_n=cfg.samples,
        accuracy=sum(r.reward for r in rollouts) / n,
        num_prompts=n,
        mean_response_tokens=sum(len(r.completion.token_ids) for r in rollouts) / n,
        truncated_fraction=sum(r.completion.finish_reason == "length" for r in rollouts) / n,
        samples=[{"id": r.prompt.id, "answer": r.prompt.answer, "response": r.completion.text,
                  "reward": r.reward} for r in rollouts],
    )


def _generate_and_score(engine: RolloutEngine, encode: Callable[[Prompt], list[int]],
                        score: Callable[[list[tuple[str, str, str]]], list[float]], prompts: list[Prompt],
                        params: SamplingParams) -> list[RolloutGroup]:
    groups = generate_groups(engine, prompts, encode, params)
    score_groups(groups, score)
    return groups


def _sampled_accuracy(produce: Producer, prompts: list[Prompt], stop_ids: list[int], cfg: EvalConfig) -> float:
    """Mean reward over `cfg.samples` responses per prompt at `cfg.temperature` (seeded)."""
    params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            stop_token_ids=stop_ids, seed=cfg.seed)
    groups = produce(prompts, params)
    rewards = [r.reward for g in groups for r in g.rollouts]
    return sum(rewards) / len(rewards)
