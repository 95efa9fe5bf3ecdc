"""Division of rollout work over DP replicas: shares, the DP slice of a batch, the row format."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.divide import DividedRollout, _decode, _encode, dp_share
from spark_mcore.rollout.groups import response_seeds
from spark_mcore.trainer.batching import dp_slice
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup, TrainBatch


def _prompt(i: int) -> Prompt:
    return Prompt(id=f"p{i}", messages=[{"role": "user", "content": "q"}], answer=str(i))


def test_shares_are_strided_and_cover_every_prompt_once() -> None:
    assert dp_share(10, 1, 3) == [1, 4, 7]
    assert sorted(i for d in range(3) for i in dp_share(10, d, 3)) == list(range(10))
    assert dp_share(1, 1, 2) == []


def test_dp_slice_pads_with_empty_rows_and_splits_evenly() -> None:
    batch = TrainBatch(tokens=torch.arange(15).view(5, 3), loss_mask=torch.ones(5, 3),
                       advantages=torch.arange(5.0), kinds=["policy"] * 5)
    first, second = dp_slice(batch, 0, 2), dp_slice(batch, 1, 2)
    assert first.num_sequences == second.num_sequences == 3
    assert torch.equal(torch.cat([first.tokens, second.tokens])[:5], batch.tokens)
    assert second.loss_mask[-1].sum() == 0 and second.advantages[-1] == 0 and second.kinds[-1] == "pad"
    assert dp_slice(batch, 0, 1) is batch


def test_rows_survive_the_wire_format() -> None:
    prompts = [_prompt(0), _prompt(1)]
    groups = [RolloutGroup(p, [Rollout(p, [1, 2], Completion([3, 4], "é 4", [-0.5, -0.25], "stop"), reward=1.0,
                                       policy_version=3)]) for p in prompts]
    back = _decode(_encode(groups), prompts, "test")
    assert back == groups


def test_world_size_one_passes_seeds_from_prompt_ids() -> None:
    seen: list[SamplingParams] = []

    def local(prompts: list[Prompt], params: SamplingParams) -> list[RolloutGroup]:
        seen.append(params)
        return [RolloutGroup(p, [Rollout(p, [1], Completion([2], "x"))] * params.n) for p in prompts]

    ps = SimpleNamespace(rank=0, world_size=1, tp_rank=0, pp_rank=0, cp_rank=0, cp_size=1, dp_rank=0, dp_size=1)
    divided = DividedRollout(local, ps)  # type: ignore[arg-type]
    prompts = [_prompt(i) for i in range(3)]
    groups = divided(prompts, SamplingParams(n=2, temperature=1.0, seed=7))
    assert [g.prompt.id for g in groups] == ["p0", "p1", "p2"]
    assert seen[0].sample_seeds == response_seeds(prompts, 2, 7)
    assert divided.last_responses == 6 and divided.total_responses == 6
