"""Recycle verified rollout groups into pointwise, pairwise and reflection reward tasks.

Selection (the public SPARK recipe, for any number of groups and any group sizes):
  all responses right  -> pointwise on one of them, label "Yes"
  all responses wrong  -> pointwise on one of them, label "No"
  right and wrong      -> pointwise with prob `pointwise_prob_mixed` (on a right or a wrong
                          response, 50/50), else pairwise: one right + one wrong, order
                          shuffled, label = the letter of the right one
  any wrong response   -> also a reflection task on one wrong response, label = ground truth
At most ceil(judge_per_prompt * groups) judge and ceil(reflection_per_prompt * groups)
reflection samples are kept per call (a seeded random subset of the groups); with
`judge_balance`, first the pointwise tasks of the majority label are cut to the minority's count.
With `judge_check`, a judge task whose source task has a check writer (countdown) is scored by
the `judge_check` verifier: its answer carries the label and the reference check of the shown
response(s) (`A: <check> B: <check>` for a pair), written from the full response text.

Edge cases, by decision:
  - empty responses (after stripping trailing special tokens) are never shown; a group is
    classified by its non-empty responses, and a group with none yields nothing;
  - "answer" view of a response without `\\boxed{}` shows the full response instead
    (meta["view"] = "cot"); a pair shows both responses in the same view;
  - a pair whose two shown texts are identical is skipped (it cannot be judged);
  - groups whose prompt is itself a recycled task (meta has "spark_kind") are not recycled.
Determinism: each group draws from its own RNG seeded by (seed, step, group index, prompt
id), so a group's tasks do not depend on the other groups, and caps use a step RNG.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.templates import (
    Template,
    View,
    pick_template,
    render_pairwise,
    render_pointwise,
    render_reflection,
)
from spark_mcore.spark.text import question_text, show_response
from spark_mcore.types import (
    JUDGE_TASK,
    KIND_KEY,
    REWARD_KINDS,
    Prompt,
    RewardKind,
    RewardSample,
    RolloutGroup,
)


@dataclass(frozen=True)
class _Candidate:
    index: int  # position in the group's rollouts
    correct: bool
    text: str
    policy_version: int


class Recycler:
    """Turns verified policy groups into `RewardSample`s (see the module docstring)."""

    def __init__(self, cfg: SparkConfig) -> None:
        self.cfg = cfg
        self.last_stats: dict[str, int] = {}

    def recycle(self, groups: list[RolloutGroup], step: int) -> list[RewardSample]:
        """Reward samples from one policy step's groups, ordered by group (judge, then
        reflection). Returns [] when `spark.enabled` is False."""
        if not self.cfg.enabled:
            self.last_stats = {}
            return []
        return self.select([self.candidates(g, step, gi) for gi, g in enumerate(groups)], step)

    def candidates(self, group: RolloutGroup, step: int, index: int) -> list[RewardSample]:
        """The judge and/or reflection task of the `index`-th group of policy step `step`, before
        the per-step caps (a rollout worker recycles its groups with this; `select` caps them)."""
        if not self.cfg.enabled:
            return []
        rng = random.Random(f"spark:{self.cfg.seed}:{step}:{index}:{group.prompt.id}")
        return [s for s in self._from_group(group, step, rng) if s is not None]

    def select(self, per_group: list[list[RewardSample]], step: int) -> list[RewardSample]:
        """Applies the per-step caps to the groups' candidates (in group order, as `recycle`)."""
        if not self.cfg.enabled:
            self.last_stats = {}
            return []
        judges = [next((s for s in c if s.kind != "reflection"), None) for c in per_group]
        reflections = [next((s for s in c if s.kind == "reflection"), None) for c in per_group]
        judge_cap, reflection_cap = self.cfg.caps(len(per_group))
        step_rng = random.Random(f"spark-caps:{self.cfg.seed}:{step}")
        balanced_out = 0
        if self.cfg.judge_balance:
            judges, balanced_out = _balanced(judges, random.Random(f"spark-balance:{self.cfg.seed}:{step}"))
        keep_j = _capped(judges, judge_cap, step_rng)
        keep_r = _capped(reflections, reflection_cap, step_rng)
        out: list[RewardSample] = []
        for gi in range(len(per_group)):
            out += [
                s for s, keep in ((judges[gi], gi in keep_j), (reflections[gi], gi in keep_r)) if keep and s
            ]
        self.last_stats = _stats(out, judges, reflections)
        if self.cfg.judge_balance:
            self.last_stats["spark/balanced_out"] = balanced_out
        return out

    def _from_group(
        self, group: RolloutGroup, step: int, rng: random.Random
    ) -> tuple[RewardSample | None, RewardSample | None]:
        if KIND_KEY in group.prompt.meta:
            return None, None
        cands = [
            _Candidate(i, r.correct, r.completion.text, r.policy_version)
            for i, r in enumerate(group.rollouts)
            if show_response(r.completion.text, "cot") is not None
        ]
        right = [c for c in cands if c.correct]
        wrong = [c for c in cands if not c.correct]
        judge: RewardSample | None = None
        if right and wrong and rng.random() >= self.cfg.pointwise_prob_mixed:
            judge = self._pairwise(group, step, rng, right, wrong)
        elif right and wrong:
            pool = right if rng.random() < 0.5 else wrong
            judge = self._pointwise(group, step, rng, pool[rng.randrange(len(pool))])
        elif cands:  # all right or all wrong: the same draws either way, so no label leak
            judge = self._pointwise(group, step, rng, cands[rng.randrange(len(cands))])
        reflection = self._reflection(group, step, rng, wrong[rng.randrange(len(wrong))]) if wrong else None
        return judge, reflection

    def _view(self, rng: random.Random) -> View:
        mode = self.cfg.content_mode
        if mode == "both":
            return "cot" if rng.random() < 0.5 else "answer"
        return mode  # type: ignore[return-value]

    def _show(self, cand: _Candidate, view: View) -> tuple[str, View]:
        shown = show_response(cand.text, view, self.cfg.max_shown_chars)
        assert shown is not None  # candidates are non-empty by construction
        return shown

    def _pointwise(
        self, group: RolloutGroup, step: int, rng: random.Random, cand: _Candidate
    ) -> RewardSample:
        view = self._view(rng)
        template = pick_template("pointwise", rng)
        shown, used = self._show(cand, view)
        text = render_pointwise(template, question_text(group.prompt), shown, used)
        label = "Yes" if cand.correct else "No"
        task, answer = self._judge_reference(group.prompt, label, [cand])
        return _sample("pointwise", group, step, text, label, task, template, used, [cand], answer)

    def _pairwise(
        self,
        group: RolloutGroup,
        step: int,
        rng: random.Random,
        right: list[_Candidate],
        wrong: list[_Candidate],
    ) -> RewardSample | None:
        good, bad = right[rng.randrange(len(right))], wrong[rng.randrange(len(wrong))]
        good_first = rng.random() < 0.5
        view = self._view(rng)
        template = pick_template("pairwise", rng)
        (g_text, g_view), (b_text, b_view) = self._show(good, view), self._show(bad, view)
        if g_view != b_view or g_text == b_text:
            (g_text, g_view), (b_text, b_view) = self._show(good, "cot"), self._show(bad, "cot")
        if g_text == b_text:
            return None
        a, b = (g_text, b_text) if good_first else (b_text, g_text)
        text = render_pairwise(template, question_text(group.prompt), a, b, g_view)
        shown = [good, bad] if good_first else [bad, good]
        label = "A" if good_first else "B"
        task, answer = self._judge_reference(group.prompt, label, shown)
        return _sample("pairwise", group, step, text, label, task, template, g_view, shown, answer)

    def _judge_reference(self, src: Prompt, label: str, shown: list[_Candidate]) -> tuple[str, str]:
        """(verifier, answer) of a judge task: `judge` + the label, or with `judge_check` and a
        check writer for the source task, `judge_check` + label and reference check."""
        if not self.cfg.judge_check:
            return JUDGE_TASK, label
        # lazy: spark/ does not load the verifier package just to be imported
        from spark_mcore.rewards.judge_check import JUDGE_CHECK_TASK, get_check_writer, judge_check_answer

        writer = get_check_writer(src.task)
        if writer is None:
            return JUDGE_TASK, label
        checks = [writer(c.text, str(src.answer))[0] for c in shown]
        check = checks[0] if len(checks) == 1 else " ".join(f"{p}: {c}" for p, c in zip("AB", checks, strict=True))
        return JUDGE_CHECK_TASK, judge_check_answer(label, check, self.cfg.judge_check_weight)

    def _reflection(
        self, group: RolloutGroup, step: int, rng: random.Random, cand: _Candidate
    ) -> RewardSample:
        view = self._view(rng)
        template = pick_template("reflection", rng)
        shown, used = self._show(cand, view)
        text = render_reflection(template, question_text(group.prompt), shown, used)
        # The corrected answer is checked by the verifier that checked the source prompt.
        src = group.prompt
        return _sample("reflection", group, step, text, src.answer, src.task, template, used, [cand])


def _sample(
    kind: RewardKind,
    group: RolloutGroup,
    step: int,
    text: str,
    label: str,
    task: str,
    template: Template,
    view: View,
    shown: list[_Candidate],
    answer: str | None = None,
) -> RewardSample:
    """`answer`: the task's reference for its verifier (default: the label itself)."""
    src = group.prompt
    meta = {
        KIND_KEY: kind,
        "source_prompt_id": src.id,
        "source_task": src.task,
        "source_rollouts": [c.index for c in shown],
        "template_id": template.id,
        "view": view,
        "step": step,
        "policy_version": max(c.policy_version for c in shown),
    }
    prompt = Prompt(
        id=f"{src.id}@s{step}:{kind}",
        messages=[{"role": "user", "content": text}],
        answer=label if answer is None else answer,
        task=task,
        images=list(src.images),
        meta=meta,
    )
    return RewardSample(kind=kind, prompt=prompt, source_prompt_id=src.id, label=label)


def _capped(samples: list[RewardSample | None], cap: int, rng: random.Random) -> set[int]:
    """Indices of the samples kept: all when within the cap, else a seeded random subset."""
    present = [i for i, s in enumerate(samples) if s is not None]
    if len(present) <= cap:
        return set(present)
    return set(rng.sample(present, cap))


def _balanced(judges: list[RewardSample | None], rng: random.Random) -> tuple[list[RewardSample | None], int]:
    """`judges` with the pointwise samples of the majority label cut (a seeded subset set to
    None) to the minority label's count; returns (judges, how many were cut)."""
    by_label: dict[str, list[int]] = {"Yes": [], "No": []}
    for i, s in enumerate(judges):
        if s is not None and s.kind == "pointwise" and s.label in by_label:
            by_label[s.label].append(i)
    keep = min(len(v) for v in by_label.values())
    cut = {i for v in by_label.values() if len(v) > keep for i in rng.sample(v, len(v) - keep)}
    return [None if i in cut else s for i, s in enumerate(judges)], len(cut)


def _stats(
    out: list[RewardSample], judges: list[RewardSample | None], reflections: list[RewardSample | None]
) -> dict[str, int]:
    stats = {f"spark/{k}": sum(s.kind == k for s in out) for k in REWARD_KINDS}
    stats["spark/capped_judge"] = (
        sum(s is not None for s in judges) - stats["spark/pointwise"] - stats["spark/pairwise"]
    )
    stats["spark/capped_reflection"] = sum(s is not None for s in reflections) - stats["spark/reflection"]
    return stats
