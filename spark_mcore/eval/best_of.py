"""Best-of-N selection at test time (`spark-mcore eval --best-of N --select step-head|judge`):
sample N responses per held-out prompt, score each, keep the argmax, and report the accuracy
of the kept responses against pass@N (some response is right: what a perfect selector gets)
and avg@N (the mean: what a random pick gets).

Selectors:
  step-head - MetaStone-S1's SPRM: the geometric mean of the sigmoid step scores of the head
      exported beside the HF weights (step_head.safetensors, model.step_head=true), read off
      the second-to-last layer's hidden state at each step end, as in training.
  judge - SPARK's generative judge: the same model asked the pointwise question (one of its
      pointwise templates, seeded per prompt, the same for the N candidates) and scored by
      P(Yes) / (P(Yes) + P(No)) of the verdicts "\\boxed{Yes}" / "\\boxed{No}" as its reply
      (teacher-forced: the probability of answering with the verdict straight away).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from spark_mcore.algo.step_head import best_of_n, geometric_mean_scores
from spark_mcore.models.step_head import StepHead
from spark_mcore.rollout.base import RolloutEngine, SamplingParams
from spark_mcore.spark.judging import EncodeFn, user_prompt
from spark_mcore.spark.templates import View, pick_template, render_pointwise
from spark_mcore.spark.text import question_text, show_response
from spark_mcore.types import Prompt

SELECTORS = ("step-head", "judge")
# (prompt, its token ids, the N responses' token ids, their texts) -> N scores
Scorer = Callable[[Prompt, list[int], list[list[int]], list[str]], list[float]]


@dataclass
class BestOfResult:
    select: str
    n: int
    num_prompts: int
    selected_accuracy: float
    pass_at_n: float
    avg_at_n: float

    def table(self) -> str:
        return (f"| selector | best-of-{self.n} accuracy | pass@{self.n} | avg@{self.n} | prompts |\n"
                f"|---|---|---|---|---|\n| {self.select} | {self.selected_accuracy:.3f} | {self.pass_at_n:.3f} | "
                f"{self.avg_at_n:.3f} | {self.num_prompts} |")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selection_accuracy(correct: Tensor, scores: Tensor) -> tuple[float, float, float]:
    """correct [P, N] bool, scores [P, N] -> (accuracy of each prompt's argmax-score response,
    pass@N, avg@N), each a mean over prompts (0s when P is 0)."""
    if correct.shape != scores.shape or correct.dim() != 2:
        raise ValueError(f"correct {tuple(correct.shape)} and scores {tuple(scores.shape)} must be one [P, N] shape")
    if correct.shape[0] == 0:
        return 0.0, 0.0, 0.0
    right = correct.float()
    picked = right.gather(1, best_of_n(scores)[:, None])[:, 0]
    return float(picked.mean()), float(right.amax(dim=1).mean()), float(right.mean())


def _padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


class StepHeadScorer:
    """Scores responses with the SPRM head on the HF model's second-to-last hidden state
    (`hidden_states[-2]`: index 0 is the embeddings, index L the final-normed last layer)."""

    def __init__(self, model: Any, head: StepHead, steps_of: Callable[[list[int]], list[int]], pad_id: int = 0) -> None:
        self.model, self.head, self.steps_of, self.pad_id = model, head.eval(), steps_of, pad_id

    @torch.no_grad()
    def __call__(self, prompt: Prompt, prompt_ids: list[int], responses: list[list[int]],
                 texts: list[str]) -> list[float]:
        ids, mask = _padded([prompt_ids + r for r in responses], self.pad_id)
        out = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                         output_hidden_states=True)
        hidden = out.hidden_states[-2].float().cpu()  # [N, T, C] output of layer L-1
        steps = [[len(prompt_ids) + p for p in self.steps_of(r)] for r in responses]
        width = max(1, max(len(s) for s in steps))
        pos = torch.full((len(responses), width), -1, dtype=torch.long)
        for i, s in enumerate(steps):
            pos[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        states = hidden.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.head(states)
        return geometric_mean_scores(logits, pos >= 0).tolist()


class JudgeScorer:
    """P(Yes) of SPARK's pointwise judge on each response, the same model judging."""

    def __init__(self, model: Any, tokenizer: Any, encode: EncodeFn, view: View = "cot", seed: int = 0) -> None:
        self.model, self.encode, self.view, self.seed = model, encode, view, seed
        self.pad_id = tokenizer.pad_token_id or 0
        self.verdicts = [tokenizer.encode(f"\\boxed{{{v}}}", add_special_tokens=False) for v in ("Yes", "No")]

    @torch.no_grad()
    def _logprob(self, contexts: list[list[int]], cont: list[int]) -> Tensor:
        """[N] log p(cont | context) of each context."""
        ids, mask = _padded([c + cont for c in contexts], self.pad_id)
        logits = self.model(input_ids=ids.to(self.model.device),
                            attention_mask=mask.to(self.model.device)).logits.float().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        total = torch.zeros(len(contexts))
        for i, c in enumerate(contexts):
            for k, tok in enumerate(cont):
                total[i] += logp[i, len(c) + k - 1, tok]
        return total

    def __call__(self, prompt: Prompt, prompt_ids: list[int], responses: list[list[int]],
                 texts: list[str]) -> list[float]:
        template = pick_template("pointwise", random.Random(f"best-of:{self.seed}:{prompt.id}"))
        question = question_text(prompt)
        contexts = []
        for k, text in enumerate(texts):
            shown = show_response(text, self.view) or ("(no response)", "cot")
            judge = user_prompt(prompt, f"best-of-judge{k}", render_pointwise(template, question, *shown), "judge")
            contexts.append(list(self.encode(judge)))
        yes, no = (self._logprob(contexts, v) for v in self.verdicts)
        return torch.sigmoid(yes - no).tolist()


def best_of_eval(engine: RolloutEngine, encode: EncodeFn, prompts: Sequence[Prompt], params: SamplingParams,
                 verify: Callable[[Prompt, str], float], scorer: Scorer, select: str) -> BestOfResult:
    """Samples params.n responses per prompt, verifies them, and keeps each prompt's best-
    scored one (the first on ties)."""
    if params.n < 1:
        raise ValueError(f"--best-of must be >= 1, got {params.n}")
    correct, scores = [], []
    all_ids = [list(encode(p)) for p in prompts]
    outs = engine.generate(all_ids, params) if prompts else []
    for prompt, ids, completions in zip(prompts, all_ids, outs, strict=True):
        if len(completions) != params.n:
            raise RuntimeError(f"the engine returned {len(completions)} responses for prompt {prompt.id!r}, "
                               f"expected {params.n}")
        texts = [c.text for c in completions]
        correct.append([verify(prompt, t) > 0.5 for t in texts])
        scores.append(scorer(prompt, ids, [list(c.token_ids) for c in completions], texts))
    shape = (len(prompts), params.n)
    sel, pass_n, avg_n = selection_accuracy(torch.tensor(correct, dtype=torch.bool).reshape(shape),
                                            torch.tensor(scores, dtype=torch.float64).reshape(shape))
    return BestOfResult(select, params.n, len(prompts), sel, pass_n, avg_n)
