"""Prefix-RFT's pure functions against hand-computed values; rollout.prefix config checks."""

from __future__ import annotations

import math

import pytest
import torch

from spark_mcore.algo.prefix import (
    cosine_schedule,
    dr_grpo_advantages,
    draw_prefix_fractions,
    entropy_keep_mask,
    prefix_fraction_bounds,
    prefix_lengths,
    prefix_mask,
    prefix_rft_loss,
)
from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.rollout.config import PrefixConfig, RolloutConfig


def test_cosine_schedule_decays_and_clamps() -> None:
    assert cosine_schedule(0, 10, 0.95, 0.05) == pytest.approx(0.95)
    assert cosine_schedule(5, 10, 0.95, 0.05) == pytest.approx(0.5)
    assert cosine_schedule(1, 4, 0.95, 0.05) == pytest.approx(0.05 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cosine_schedule(10, 10, 0.95, 0.05) == pytest.approx(0.05)
    assert cosine_schedule(15, 10, 0.95, 0.05) == pytest.approx(0.05)  # clamped after the end
    assert cosine_schedule(-3, 10, 0.95, 0.05) == pytest.approx(0.95)
    assert cosine_schedule(3, 0, 0.95, 0.05) == 0.05


def test_prefix_fraction_bounds() -> None:
    assert prefix_fraction_bounds(5, 10, low=(0.05, 0.05), high=(0.95, 0.05)) == pytest.approx((0.05, 0.5))
    assert prefix_fraction_bounds(10, 10, low=(0.05, 0.05), high=(0.95, 0.05)) == pytest.approx((0.05, 0.05))
    # out-of-range pairs are clamped into [0, 1], and low never exceeds high
    assert prefix_fraction_bounds(0, 10, low=(0.9, 0.0), high=(1.2, 0.0)) == pytest.approx((0.9, 1.0))
    assert prefix_fraction_bounds(10, 10, low=(0.9, 0.5), high=(1.0, 0.2)) == pytest.approx((0.2, 0.2))


def test_draw_fractions_and_lengths() -> None:
    g = torch.Generator().manual_seed(0)
    p = draw_prefix_fractions(1000, 0.2, 0.6, g)
    assert p.shape == (1000,) and float(p.min()) >= 0.2 and float(p.max()) <= 0.6
    assert float(p.mean()) == pytest.approx(0.4, abs=0.02)
    assert torch.equal(draw_prefix_fractions(3, 0.3, 0.3), torch.full((3,), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="low <= high"):
        draw_prefix_fractions(2, 0.7, 0.3)
    lengths = prefix_lengths(torch.tensor([0.5, 0.25, 0.0, 1.0, 0.3]), torch.tensor([7, 8, 5, 3, 10]))
    assert lengths.tolist() == [3, 2, 0, 3, 3]  # floor(p * n); 0.3 * 10 stays 3 despite rounding


def test_prefix_mask_marks_first_response_tokens() -> None:
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    mask = prefix_mask(torch.tensor([2, 0, 2]), loss_mask)
    assert mask.int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    with pytest.raises(ValueError, match="longer than its response"):
        prefix_mask(torch.tensor([4, 0, 0]), loss_mask)


def test_entropy_keep_mask_top_fraction_of_batch_prefix_tokens() -> None:
    prefix = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    entropy = torch.tensor([[9.0, 0.5, 2.0, 0.1, 9.0], [9.0, 1.5, 0.3, 3.0, 9.0]])
    # 6 prefix tokens, 20 % -> ceil(1.2) = 2 kept: the entropies 3.0 and 2.0 (non-prefix 9.0 ignored)
    keep = entropy_keep_mask(entropy, prefix, 0.2)
    assert keep.int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert entropy_keep_mask(entropy, prefix, 1.0).equal(prefix)
    # ties: the earlier position wins
    tie = entropy_keep_mask(torch.ones(2, 5), prefix, 0.1)
    assert tie.int().tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert not entropy_keep_mask(entropy, torch.zeros_like(prefix), 0.2).any()


def test_prefix_rft_loss_hand_computed() -> None:
    # row 0: response tokens 1..3, prefix 1..2 (token 1 kept), token 3 on-policy; A = +2
    # row 1: response tokens 1..2, on-policy; A = -1. old_logp = 0 on on-policy tokens.
    ln = math.log
    logp = torch.tensor([[0.0, ln(0.5), ln(0.25), ln(1.5)], [0.0, ln(0.5), ln(1.1), 0.0]],
                        dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 5.0, -7.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # prefix: no ratio
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    prefix = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, m = prefix_rft_loss(logp, old, adv, mask, prefix, keep, clip_eps=0.2)
    # prefix kept: -2 ln 0.5; prefix not kept: 0; r=1.5, A=2 clipped: -2.4;
    # r=0.5, A=-1 clipped: 0.8; r=1.1, A=-1: 1.1. Token mean over 5 tokens.
    assert loss.item() == pytest.approx((-2 * ln(0.5) + 0.0 - 2.4 + 0.8 + 1.1) / 5)
    loss.backward()
    expected = torch.tensor([[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 1.1, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(logp.grad, expected)
    assert m["prefix_token_frac"].item() == pytest.approx(2 / 5)
    assert m["prefix_kept_frac"].item() == pytest.approx(0.5)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)  # 2 clipped of 5 response tokens
    # the prefix term has no clip: a kept prefix token far from the old policy still pulls
    far = logp.detach().clone()
    far[0, 1] = ln(1e-4)
    far.requires_grad_()
    prefix_rft_loss(far, old, adv, mask, prefix, keep, clip_eps=0.2)[0].backward()
    assert far.grad[0, 1].item() == pytest.approx(-2.0 / 5)
    # without prefix tokens it is the PPO-clip loss
    from spark_mcore.algo.losses import policy_loss
    none = torch.zeros_like(prefix)
    a = prefix_rft_loss(logp.detach(), torch.zeros_like(old), adv, mask, none, none, clip_eps=0.2)[0]
    b = policy_loss(logp.detach(), torch.zeros_like(old), adv, mask, clip_eps=0.2)
    assert a.item() == pytest.approx(b[0].item())
    ma = prefix_rft_loss(logp.detach(), torch.zeros_like(old), adv, mask, none, none, clip_eps=0.2)[1]
    for key in ("clip_frac", "ratio_mean", "approx_kl"):
        assert ma[key].item() == pytest.approx(b[1][key].item()), key


def test_dr_grpo_baseline_no_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    adv = dr_grpo_advantages(rewards, torch.tensor([0, 0, 0, 1, 1]))
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0]))


def test_prefix_config_validated() -> None:
    assert not load_run_config(None, []).rollout.prefix.enabled
    cfg = load_run_config(None, ["rollout.prefix.enabled=true"]).rollout.prefix
    assert (cfg.members, cfg.high_start, cfg.high_end, cfg.entropy_keep) == (1, 0.95, 0.05, 0.2)
    with pytest.raises(ConfigError, match="rollout.prefix.enabled=true needs rollout.source=inprocess"):
        RolloutConfig(source="stream", prefix=PrefixConfig(enabled=True))
    with pytest.raises(ConfigError, match="rollout.prefix.members=8 must be < rollout.n=8"):
        RolloutConfig(n=8, prefix=PrefixConfig(enabled=True, members=8))
    with pytest.raises(ConfigError, match="rollout.prefix.high_start"):
        PrefixConfig(high_start=1.5)
    with pytest.raises(ConfigError, match="rollout.prefix.entropy_keep"):
        PrefixConfig(entropy_keep=0.0)
    with pytest.raises(ConfigError, match="low_start/low_end"):
        PrefixConfig(low_end=0.5, high_end=0.1)


def test_prefix_token_advantages_keep_only_high_entropy_prefix_tokens() -> None:
    from spark_mcore.algo.prefix import prefix_token_advantages

    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float32)
    prefix = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    # prefix entropies: 0.5, 3.0, 1.0 (row 0) and 2.0 (row 1); ceil(0.5 * 4) = 2 kept: 3.0 and 2.0
    entropy = torch.tensor([[9.0, 0.5, 3.0, 1.0, 7.0], [9.0, 9.0, 2.0, 5.0, 0.0]])
    out, metrics = prefix_token_advantages(adv, mask, prefix, entropy, keep_fraction=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0, 0.0, 2.0], [0.0, 0.0, -1.0, -1.0, 0.0]]))
    assert metrics == pytest.approx({"prefix_kept_frac": 0.5, "prefix_entropy": (0.5 + 3.0 + 1.0 + 2.0) / 4})
    # per-token advantages (SPRO) keep their values where kept, 0 on dropped prefix tokens
    token_adv = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    out, _ = prefix_token_advantages(token_adv, mask, prefix, entropy, keep_fraction=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0, 0.0, 4.0], [0.0, 0.0, 7.0, 8.0, 0.0]]))
    # no prefix tokens: the advantages broadcast over the mask, metrics 0
    out, metrics = prefix_token_advantages(adv, mask, torch.zeros_like(prefix), entropy, 0.2)
    torch.testing.assert_close(out, adv[:, None] * mask)
    assert metrics == {"prefix_kept_frac": 0.0, "prefix_entropy": 0.0}


def test_grpo_loss_with_prefix_is_unclipped_on_prefix_and_skips_its_kl() -> None:
    from spark_mcore.algo.config import AlgoConfig
    from spark_mcore.algo.losses import grpo_loss

    logp = torch.tensor([[0.0, -1.0, -0.5, -0.2]], requires_grad=True)
    old = torch.tensor([[0.0, -9.0, -0.7, -0.2]])  # the prefix token's old log-prob plays no role
    ref = torch.tensor([[0.0, -3.0, -0.5, -0.4]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    prefix = torch.tensor([[False, True, False, False]])
    cfg = AlgoConfig(kl_coef=0.1, clip_eps=0.2)
    loss, m = grpo_loss(logp, old, ref, torch.tensor([1.5]), mask, cfg, prefix=prefix)
    # prefix: -1.5 * -1.0 = 1.5; t2: ratio e^0.2 = 1.221 clipped to 1.2 -> -1.8; t3: ratio 1 -> -1.5
    pg = (1.5 - 1.8 - 1.5) / 3
    kl = (math.exp(-0.2) + 0.2 - 1.0) / 3  # k3 of t3 only (t2: logp == ref); the prefix's is skipped
    assert m["pg_loss"].item() == pytest.approx(pg)
    assert m["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(pg + 0.1 * kl)
    assert m["prefix_token_frac"].item() == pytest.approx(1 / 3)
    assert m["clip_frac"].item() == pytest.approx(1 / 3)  # 1 clipped of 3 response tokens
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(-1.5 / 3)  # d(-A logp)/d logp / 3 tokens: no ratio


def test_prefix_rft_loss_importance_weights_only_on_policy_tokens() -> None:
    logp = torch.tensor([[0.0, -1.0, -0.5, -0.2]])
    old = torch.tensor([[0.0, -9.0, -0.7, -0.2]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    prefix = torch.tensor([[False, True, False, False]])
    weights = torch.tensor([[1.0, 9.0, 0.5, 1.0]])  # 9.0 on the prefix token must not count
    loss, _ = prefix_rft_loss(logp, old, torch.tensor([1.5]), mask, prefix, None, clip_eps=0.2, is_weights=weights)
    assert loss.item() == pytest.approx((1.5 - 1.8 * 0.5 - 1.5) / 3)
