"""`spark.check_demo`: the reference check of a recycled judge task joins its GRPO group.

A DEVIATION from the paper, whose reward steps are pure on-policy RL. With `spark.judge_check`
a recycled countdown judge task carries the reference check of the response it shows, and its
label is verified, so that check followed by the right verdict is a correct response the
policy can be shown (rejection-sampling-style self-training, as off-policy guidance does in
LUFFY). With `check_demo` on, every such group of a reward step gets one more member: that
text, scored by the task's verifier like any sample (1.0 by construction). GRPO then raises its
likelihood with the group's advantage (large when the sampled checks are poor, zero when the
whole group already scores 1.0), a self-weighting supervised term on the written check.

The demonstration's tokens are the text encoded as an assistant response (`encode`, ending
with the end-of-turn token) after the group's own prompt ids; it is not sampled, so it has no
engine log-probs (a batch with one then reports no log-prob mismatch) and the trainer's
recomputed old log-probs make its first-update ratio 1. Metrics of the sampled responses
(judge accuracy) are logged before demonstrations are added.
"""

from __future__ import annotations

from collections.abc import Callable

from spark_mcore.types import Completion, Rollout, RolloutGroup

Encode = Callable[[str], list[int]]  # response text -> its token ids (with the end-of-turn token)


def with_check_demos(groups: list[RolloutGroup], encode: Encode) -> tuple[list[RolloutGroup], int]:
    """(`groups` with a demonstration added to each group of a `judge_check` task, how many
    were added). Other groups, and groups without rollouts, are returned as they are."""
    # lazy: spark/ does not load the verifier package just to be imported
    from spark_mcore.rewards import get_verifier
    from spark_mcore.rewards.judge_check import JUDGE_CHECK_TASK, parse_judge_check_answer

    out: list[RolloutGroup] = []
    for g in groups:
        parsed = parse_judge_check_answer(g.prompt.answer) if g.prompt.task == JUDGE_CHECK_TASK else None
        if parsed is None or not g.rollouts:
            out.append(g)
            continue
        label, check, _ = parsed
        text = f"{check} \\boxed{{{label}}}".strip()
        first = g.rollouts[0]
        demo = Rollout(prompt=g.prompt, prompt_ids=list(first.prompt_ids),
                       completion=Completion(token_ids=list(encode(text)), text=text),
                       reward=float(get_verifier(JUDGE_CHECK_TASK)(text, g.prompt.answer)),
                       policy_version=max(r.policy_version for r in g.rollouts))
        out.append(RolloutGroup(prompt=g.prompt, rollouts=[*g.rollouts, demo]))
    return out, sum(len(a.rollouts) != len(b.rollouts) for a, b in zip(out, groups, strict=True))


__all__ = ["with_check_demos"]
