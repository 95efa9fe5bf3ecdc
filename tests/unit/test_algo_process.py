"""SPRO's cumulative process reward and Masked Step Advantage against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.losses import grpo_loss, policy_loss
from spark_mcore.algo.process import (
    cumulative_process_rewards,
    from_response_layout,
    masked_step_advantages,
    spro_advantages,
    spro_token_advantages,
    to_response_layout,
)
from spark_mcore.config.loader import ConfigError
from spark_mcore.trainer.advantages import refine_advantages
from spark_mcore.types import TrainBatch

# Two groups, interleaved rows [A0, B0, A1, B1, A2]; response lengths A: 3, 2, 1 and B: 2, 4.
# Per-token logp - ref_logp (response-aligned), beta = 0.5:
#   A0 [0.2, -0.4, 1.0] -> R [0.1, -0.1, 0.4]     B0 [1, 1]          -> R [0.5, 1.0]
#   A1 [0.6, 0.2]       -> R [0.3, 0.4]           B1 [0, -1, 2, 0.5] -> R [0, -0.5, 0.5, 0.75]
#   A2 [-0.4]           -> R [-0.2]
DIFFS = [[0.2, -0.4, 1.0], [1.0, 1.0], [0.6, 0.2], [0.0, -1.0, 2.0, 0.5], [-0.4]]
GROUPS = torch.tensor([5, 9, 5, 9, 5])
BETA = 0.5
R = [[0.1, -0.1, 0.4, 0], [0.5, 1.0, 0, 0], [0.3, 0.4, 0, 0], [0.0, -0.5, 0.5, 0.75], [-0.2, 0, 0, 0]]
# MSA: A at t=0 mean (0.1 + 0.3 - 0.2) / 3 = 1/15; t=1 mean (-0.1 + 0.4) / 2 = 0.15; t=2 only A0 -> 0.
#      B at t=0 mean 0.25, t=1 mean 0.25; t=2, 3 only B1 -> 0.
MSA = [[0.1 - 1 / 15, -0.25, 0, 0], [0.25, 0.75, 0, 0], [0.3 - 1 / 15, 0.25, 0, 0],
       [-0.25, -0.75, 0, 0], [-0.2 - 1 / 15, 0, 0, 0]]


def _aligned() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    active = torch.tensor([[i < len(d) for i in range(4)] for d in DIFFS])
    ref = torch.full((5, 4), -1.0, dtype=torch.float64)
    logp = ref + torch.tensor([d + [0.0] * (4 - len(d)) for d in DIFFS], dtype=torch.float64)
    logp = torch.where(active, logp, torch.tensor(100.0, dtype=torch.float64))  # padding garbage
    return logp, ref, active


def test_cumulative_process_reward_and_msa_hand_computed() -> None:
    logp, ref, active = _aligned()
    rewards = cumulative_process_rewards(logp.requires_grad_(), ref, active, BETA)
    assert not rewards.requires_grad  # a constant: no gradient through the process reward
    torch.testing.assert_close(rewards, torch.tensor(R, dtype=torch.float64))
    msa = masked_step_advantages(rewards, active, GROUPS)
    torch.testing.assert_close(msa, torch.tensor(MSA, dtype=torch.float64))
    # the positions where a single member of the group is active are exactly 0, not a residue
    assert msa[0, 2].item() == 0.0 and msa[3, 2].item() == 0.0 and msa[3, 3].item() == 0.0


def test_msa_group_of_one_and_no_std_division() -> None:
    rewards = torch.tensor([[1.0, 2.0], [3.0, 10.0]], dtype=torch.float64)
    active = torch.ones(2, 2, dtype=torch.bool)
    assert masked_step_advantages(rewards, active, torch.tensor([0, 1])).abs().sum() == 0  # singletons
    # one group: R - mean, not divided by the std (it would give +-0.707 at every position)
    torch.testing.assert_close(masked_step_advantages(rewards, active, torch.tensor([3, 3])),
                               torch.tensor([[-1.0, -4.0], [1.0, 4.0]], dtype=torch.float64))


def test_spro_advantage_is_outcome_plus_msa() -> None:
    logp, ref, active = _aligned()
    outcome = torch.tensor([1.0, -0.5, -1.0, 0.5, 0.0])
    token = spro_advantages(outcome, logp, ref, active, GROUPS, BETA)
    expected = (outcome.double()[:, None] + torch.tensor(MSA, dtype=torch.float64)) * active
    assert token.dtype == torch.float32
    torch.testing.assert_close(token, expected.float())
    # beta 0: SPRO is GRPO's outcome advantage on every response token
    torch.testing.assert_close(spro_advantages(outcome, logp, ref, active, GROUPS, 0.0),
                               (outcome[:, None] * active).float())


def _batch_layout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same responses after prompts of 2 (group A) and 1 (group B) tokens, T = 6."""
    logp_a, ref_a, active = _aligned()
    starts = [2, 1, 2, 1, 2]
    mask = torch.zeros(5, 6)
    logp, ref = torch.zeros(5, 6, dtype=torch.float64), torch.zeros(5, 6, dtype=torch.float64)
    for i, s in enumerate(starts):
        n = int(active[i].sum())
        mask[i, s:s + n] = 1
        logp[i, s:s + n], ref[i, s:s + n] = logp_a[i, :n], ref_a[i, :n]
    return logp, ref, mask


def test_response_layout_round_trip() -> None:
    logp, _, mask = _batch_layout()
    aligned, active, start = to_response_layout(logp, mask)
    assert start.tolist() == [2, 1, 2, 1, 2]
    assert active.sum(1).tolist() == [3, 2, 2, 4, 1]
    torch.testing.assert_close(from_response_layout(aligned, active, start, 6), logp * mask)
    with pytest.raises(ValueError, match="contiguous"):
        to_response_layout(logp, torch.tensor([[0, 1, 0, 1, 0, 0]] * 5))


def test_spro_token_advantages_in_batch_layout() -> None:
    logp, ref, mask = _batch_layout()
    outcome = torch.tensor([1.0, -0.5, -1.0, 0.5, 0.0])
    token = spro_token_advantages(outcome, logp.float(), ref.float(), mask, GROUPS, BETA)
    assert token.shape == (5, 6)
    assert token[0, 2:5].tolist() == pytest.approx([1.0 + 0.1 - 1 / 15, 1.0 - 0.25, 1.0], abs=1e-6)
    assert token[3, 1:5].tolist() == pytest.approx([0.25, -0.25, 0.5, 0.5], abs=1e-6)
    assert token[4, 2].item() == pytest.approx(-0.2 - 1 / 15, abs=1e-6)
    assert (token[mask == 0] == 0).all()


def test_policy_loss_per_token_advantages_equal_broadcast_ones() -> None:
    torch.manual_seed(0)
    logp0 = torch.randn(3, 5, dtype=torch.float64) * 0.3
    old = logp0 + torch.randn(3, 5, dtype=torch.float64) * 0.2
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64)
    per_token = torch.where(mask.bool(), adv[:, None].expand(3, 5), torch.tensor(float("inf"), dtype=torch.float64))
    cfg = AlgoConfig(kl_coef=0.0)
    results = []
    for a in (adv, per_token):
        logp = logp0.clone().requires_grad_()
        loss, metrics = grpo_loss(logp, old, None, a, mask, cfg)
        loss.backward()
        results.append((loss.detach(), metrics, logp.grad))
    assert results[0][0].item() == results[1][0].item()  # GRPO's result is unchanged, bit for bit
    assert torch.equal(results[0][2], results[1][2]) and torch.isfinite(results[1][2]).all()
    assert all(results[0][1][k].item() == results[1][1][k].item() for k in results[0][1])
    with pytest.raises(ValueError, match=r"\[B\] = \(3,\) or \[B, T\]"):
        policy_loss(logp0, old, adv[:, None].expand(3, 2), mask, 0.2)


def test_refine_advantages_grpo_untouched_spro_per_token() -> None:
    logp, ref, mask = _batch_layout()
    outcome = torch.tensor([1.0, -0.5, -1.0, 0.5, 0.0])
    batch = TrainBatch(tokens=torch.zeros(5, 6, dtype=torch.long), loss_mask=mask, advantages=outcome.clone(),
                       old_logprobs=logp.float(), ref_logprobs=ref.float(), group_ids=GROUPS)
    assert refine_advantages(batch, AlgoConfig()) == {}
    assert torch.equal(batch.advantages, outcome)
    stats = refine_advantages(batch, AlgoConfig(advantage="spro", spro_beta=BETA))
    assert batch.advantages.shape == (5, 6) and stats["adv_process_abs"] > 0
    no_ref = TrainBatch(tokens=batch.tokens, loss_mask=mask, advantages=outcome, old_logprobs=logp.float(),
                        group_ids=GROUPS)
    with pytest.raises(ValueError, match="reference"):
        refine_advantages(no_ref, AlgoConfig(advantage="spro"))


def test_spro_config() -> None:
    assert AlgoConfig(advantage="spro", kl_coef=0.0).needs_reference
    assert not AlgoConfig(kl_coef=0.0).needs_reference
    with pytest.raises(ConfigError, match="algo.spro_beta"):
        AlgoConfig(spro_beta=-0.1)


def test_token_advantages_and_group_ids_travel_through_micro_batches() -> None:
    from spark_mcore.trainer.batching import pad_rows, select
    from spark_mcore.trainer.packing import packed_micro_batches, padded_micro_batches

    logp, ref, mask = _batch_layout()
    token = spro_token_advantages(torch.tensor([1.0, -0.5, -1.0, 0.5, 0.0]), logp.float(), ref.float(), mask,
                                  GROUPS, BETA)
    batch = TrainBatch(tokens=torch.arange(30).reshape(5, 6), loss_mask=mask, advantages=token, group_ids=GROUPS)
    padded = pad_rows(batch, 4)
    assert padded.group_ids.tolist() == [5, 9, 5, 9, 5, -1, -1, -1]
    assert padded.advantages.shape == (8, 6) and (padded.advantages[5:] == 0).all()
    assert torch.equal(select(batch, torch.tensor([3, 0])).advantages, token[[3, 0]])
    for mbs in (packed_micro_batches(batch, 12, 1), padded_micro_batches(batch, 2)):
        for mb in mbs:
            keep = mb.index >= 0
            assert torch.equal(mb.seqs.advantages[keep], token[mb.index[keep]])
            assert torch.equal(mb.seqs.group_ids[keep], GROUPS[mb.index[keep]])
