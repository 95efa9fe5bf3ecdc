"""GRPO advantages against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from spark_mcore.algo.advantages import grpo_advantages, zero_variance_groups


def test_one_group_uses_sample_std() -> None:
    # mean 0.5, squared deviations 4 * 0.25 = 1, sample var 1/3, std 0.57735
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([4, 4, 4, 4]))
    expected = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([expected, -expected, expected, -expected]))


def test_mixed_sizes_interleaved_non_contiguous_ids() -> None:
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0, 2.0, 0.5, 3.0, 3.0])
    ids = torch.tensor([5, 9, 5, 9, 5, -3, 100, 100])
    adv = grpo_advantages(rewards, ids)
    # group 5: [1, 0, 2] mean 1, sample std 1 -> [0, -1, 1]
    # group 9: [2, 4] mean 3, sample std sqrt(2) -> [-1/sqrt2, 1/sqrt2]
    # group -3: size 1 -> 0; group 100: all equal -> 0
    r = 1 / math.sqrt(2)
    expected = torch.tensor([0.0, -r, -1.0, r, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_all_equal_group_is_exactly_zero() -> None:
    # 0.1 * 3 / 3 != 0.1 in float: the mean alone would leave a residue.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0], dtype=torch.float32)
    adv = grpo_advantages(rewards, torch.tensor([1, 1, 1, 2, 2]), eps=0.0)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert not torch.isnan(adv).any()


def test_size_one_group_is_zero_even_with_zero_eps() -> None:
    adv = grpo_advantages(torch.tensor([0.7]), torch.tensor([3]), eps=0.0)
    assert torch.equal(adv, torch.zeros(1))


def test_eps_is_added_to_std() -> None:
    # [1, 0]: mean 0.5, sample std sqrt(0.5); eps 1 -> 0.5 / (0.70711 + 1) = 0.29289
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=1.0)
    torch.testing.assert_close(adv, torch.tensor([0.5 / (math.sqrt(0.5) + 1), -0.5 / (math.sqrt(0.5) + 1)]))


def test_mean_centering_only() -> None:
    adv = grpo_advantages(
        torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0]), torch.tensor([0, 0, 0, 1, 1]), normalize_std=False
    )
    third = 1 / 3
    torch.testing.assert_close(adv, torch.tensor([1 - third, -third, -third, 0.0, 0.0]))


def test_dtype_is_preserved() -> None:
    adv = grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), torch.tensor([0, 0]))
    assert adv.dtype == torch.bfloat16
    torch.testing.assert_close(adv.float(), torch.tensor([0.70703125, -0.70703125]))


def test_zero_variance_groups() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    flat = zero_variance_groups(rewards, ids)
    assert flat.tolist() == [True, True, False, False, True, True, True]


def test_empty_input() -> None:
    empty = torch.zeros(0)
    ids = torch.zeros(0, dtype=torch.long)
    assert grpo_advantages(empty, ids).shape == (0,)
    assert zero_variance_groups(empty, ids).shape == (0,)


@pytest.mark.parametrize(
    ("rewards", "ids", "match"),
    [
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), "rewards must be 1-D"),
        (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), "float tensor"),
        (torch.zeros(3), torch.zeros(2, dtype=torch.long), "group_ids must have the shape"),
        (torch.zeros(3), torch.zeros(3), "group_ids must be an integer"),
        (torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long), "NaN or inf"),
    ],
)
def test_invalid_inputs_name_the_field(rewards: torch.Tensor, ids: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards, ids)


def test_negative_eps_rejected() -> None:
    with pytest.raises(ValueError, match="eps must be >= 0"):
        grpo_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), eps=-1.0)
