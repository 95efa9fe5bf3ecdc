"""Prefix-RFT rollouts: demonstrations, prompt + prefix inputs to the engine, the response as
prefix + continuation, the prefix mask and Dr. GRPO baseline in the batch, the rows' wire format."""

from __future__ import annotations

import pytest
import torch

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.algo.advantages import grpo_advantages
from spark_mcore.data.arith import arith_problems, worked_solution
from spark_mcore.data.dataset import demonstration
from spark_mcore.rollout.config import PrefixConfig
from spark_mcore.rollout.divide import _decode, _encode
from spark_mcore.rollout.groups import generate_groups, response_seeds
from spark_mcore.rollout.prefix import PrefixRollouts, prefix_metrics
from spark_mcore.trainer.batching import dp_slice, groups_to_batch, sampled_mask, split_for_updates
from spark_mcore.trainer.packing import packed_micro_batches, padded_micro_batches
from spark_mcore.types import KIND_KEY, Completion, Prompt, Rollout, RolloutGroup, SamplingParams

CONT = [7, 8, 9]  # every continuation the fake engine returns


class FakeEngine:
    """Records its inputs; each continuation is CONT, text "c"."""

    policy_version = 3

    def __init__(self) -> None:
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append(([list(p) for p in prompt_ids], params))
        return [[Completion(list(CONT), "c", [-0.1] * len(CONT), "stop") for _ in range(params.n)] for _ in prompt_ids]


def _prompts() -> list[Prompt]:
    return [Prompt("a", [{"role": "user", "content": "a"}], "1", meta={"solution": "abcdefghij"}),
            Prompt("b", [{"role": "user", "content": "b"}], "2"),  # no demonstration
            Prompt("j", [{"role": "user", "content": "j"}], "Yes", meta={KIND_KEY: "pointwise", "solution": "xyz"})]


def _rollouts(low: float = 0.5, high: float = 0.5, members: int = 2) -> PrefixRollouts:
    cfg = PrefixConfig(enabled=True, members=members, low_start=low, low_end=low, high_start=high, high_end=high)
    return PrefixRollouts(cfg, 10, tokenize=lambda t: [ord(c) for c in t], decode=lambda ids: "".join(map(chr, ids)))


def _encode_prompt(p: Prompt) -> list[int]:
    return [1, ord(p.id)]


def test_demonstrations_from_solution_field_and_builtin_tasks() -> None:
    arith = arith_problems([1], "train", 2, seed=0)[0]
    assert demonstration(arith) == worked_solution(arith)
    a, b, judge = _prompts()
    assert demonstration(a) == "abcdefghij"
    assert demonstration(b) is None  # neither a "solution" field nor a builtin task
    assert demonstration(judge) is None  # recycled SPARK tasks never get a prefix


def test_members_continue_prompt_plus_prefix() -> None:
    engine, pre = FakeEngine(), _rollouts()
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=5)
    groups = pre.generate(engine, _prompts(), _encode_prompt, params, pre.bounds(0))
    (inputs, single), = engine.calls
    demo5 = [ord(c) for c in "abcde"]  # p = 0.5 of 10 tokens
    assert inputs[:4] == [[1, 97, *demo5]] * 2 + [[1, 97]] * 2
    assert inputs[4:] == [[1, 98]] * 4 + [[1, 106]] * 4
    # one input per member, each with its response seed: on-policy members sample what
    # generate_groups would
    seeds = response_seeds(_prompts(), 4, 5)
    assert single.n == 1 and single.sample_seeds == [[s] for row in seeds for s in row]
    first = groups[0].rollouts
    assert [r.completion.prefix_len for r in first] == [5, 5, 0, 0]
    assert first[0].completion.token_ids == demo5 + CONT and first[0].completion.text == "abcde" + "c"
    assert first[0].completion.logprobs == [0.0] * 5 + [-0.1] * 3
    assert first[0].prompt_ids == [1, 97] and first[0].policy_version == 3
    assert first[2].completion.token_ids == CONT
    assert all(r.completion.prefix_len == 0 for g in groups[1:] for r in g.rollouts)
    plain = generate_groups(FakeEngine(), _prompts(), _encode_prompt, params)
    assert [r.completion.token_ids for r in plain[1].rollouts] == [r.completion.token_ids for r in groups[1].rollouts]


def test_response_is_cut_to_the_token_budget() -> None:
    pre = _rollouts()
    groups = pre.generate(FakeEngine(), _prompts()[:1], _encode_prompt,
                          SamplingParams(n=3, max_new_tokens=6, seed=1), pre.bounds(0))
    c = groups[0].rollouts[0].completion
    assert c.token_ids == [ord(x) for x in "abcde"] + [7] and c.finish_reason == "length"
    assert c.text == "abcde\x07" and c.logprobs == [0.0] * 5 + [-0.1]
    # a prefix never fills the whole budget: at most max_new_tokens - 1 tokens
    tight = pre.generate(FakeEngine(), _prompts()[:1], _encode_prompt,
                         SamplingParams(n=3, max_new_tokens=3, seed=1), pre.bounds(0))
    assert tight[0].rollouts[0].completion.prefix_len == 2


def test_fractions_are_drawn_per_member_within_bounds_and_reproducible() -> None:
    pre = _rollouts(low=0.05, high=0.95, members=6)
    params = SamplingParams(n=7, max_new_tokens=40, seed=11)
    lens = [r.completion.prefix_len for r in pre.generate(FakeEngine(), _prompts()[:1], _encode_prompt, params,
                                                           pre.bounds(0))[0].rollouts]
    again = [r.completion.prefix_len for r in pre.generate(FakeEngine(), _prompts()[:1], _encode_prompt, params,
                                                            pre.bounds(0))[0].rollouts]
    assert lens == again and lens[6] == 0
    assert all(0 <= n <= 9 for n in lens[:6]) and len(set(lens[:6])) > 1
    # the schedule: the high bound decays 0.95 -> 0.05 over the run (cosine)
    default = PrefixRollouts(PrefixConfig(enabled=True), 10, tokenize=list, decode=str)
    assert default.bounds(0) == pytest.approx((0.05, 0.95)) and default.bounds(5)[1] == pytest.approx(0.5)
    assert default.bounds(10) == pytest.approx((0.05, 0.05))
    assert PrefixRollouts(PrefixConfig(enabled=True, schedule_steps=20), 10, list, str).bounds(10)[1] == \
        pytest.approx(0.5)  # schedule_steps overrides the run length


def test_batch_prefix_mask_and_dr_grpo_baseline_of_prefix_groups() -> None:
    pre = _rollouts()
    groups = pre.generate(FakeEngine(), _prompts()[:2], _encode_prompt, SamplingParams(n=4, max_new_tokens=16,
                                                                                       seed=2), pre.bounds(0))
    for g, rewards in zip(groups, ([1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]), strict=True):
        for r, v in zip(g.rollouts, rewards, strict=True):
            r.reward = v
    batch, _ = groups_to_batch(groups, 1e-9, True, False, prefix=True)
    # group 0 has prefixed members: r - mean; group 1 is on-policy: (r - mean) / std
    torch.testing.assert_close(batch.advantages[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(batch.advantages[4:], grpo_advantages(torch.tensor([1.0, 0, 0, 0]),
                                                                     torch.zeros(4, dtype=torch.long)))
    expected = torch.zeros_like(batch.prefix_mask)
    expected[:2, 2:7] = True  # prompt [1, 97], then 5 prefix tokens
    assert torch.equal(batch.prefix_mask, expected)
    assert bool((batch.loss_mask[batch.prefix_mask] == 1).all())
    assert torch.equal(sampled_mask(batch)[0], torch.tensor([0.0] * 7 + [1.0] * 3))
    assert groups_to_batch(groups, 1e-9, True, False)[0].prefix_mask is None  # prefix off: no mask
    # the mask follows its rows through every split of the batch
    for part in [dp_slice(batch, 1, 3), *split_for_updates(batch, 2, seed=0)]:
        assert part.prefix_mask.shape == part.tokens.shape
    for mb in [*padded_micro_batches(batch, 3), *packed_micro_batches(batch, 12, 1)]:
        rows = mb.index >= 0
        assert torch.equal(mb.seqs.prefix_mask[rows], batch.prefix_mask[mb.index[rows]])


def test_prefix_rows_survive_the_divided_rollout_wire_format() -> None:
    p = _prompts()[0]
    group = RolloutGroup(p, [Rollout(p, [1, 2], Completion([5, 6, 7], "t", [0.0, 0.0, -1.0], "stop", prefix_len=2))])
    back = _decode(_encode([group]), [p], "test")[0].rollouts[0]
    assert back.completion.prefix_len == 2 and back.completion.token_ids == [5, 6, 7]


def test_prefix_metrics() -> None:
    pre = _rollouts()
    groups = pre.generate(FakeEngine(), _prompts(), _encode_prompt, SamplingParams(n=4, max_new_tokens=16, seed=2),
                          pre.bounds(0))
    groups[0].rollouts[0].reward = 1.0
    groups[0].rollouts[2].reward = 1.0
    m = prefix_metrics(groups, (0.1, 0.9))
    assert m["rollout/prefix_responses"] == 2 and m["rollout/prefix_tokens"] == 5
    assert m["rollout/prefix_accuracy"] == 0.5 and m["rollout/onpolicy_accuracy"] == 1 / 6  # judge rows excluded
    assert (m["rollout/prefix_frac_low"], m["rollout/prefix_frac_high"]) == (0.1, 0.9)
