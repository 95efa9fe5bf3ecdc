"""Losses against hand-computed values, masking invariants and registry contracts."""

from __future__ import annotations

import math

import pytest
import torch

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.losses import (
    AGGREGATORS,
    KL_ESTIMATORS,
    aggregate,
    grpo_loss,
    kl_penalty,
    policy_loss,
    register_kl_estimator,
    sft_loss,
)

LN2 = math.log(2.0)


def _ratios_to_logp(ratios: list[list[float]]) -> torch.Tensor:
    return torch.tensor(ratios, dtype=torch.float64).log().requires_grad_()


def test_policy_loss_clip_active_and_inactive() -> None:
    # old_logp = 0, so ratio = exp(logp). A = +2 for row 0, -1 for row 1, clip 0.2:
    # row 0: r=1.5 -> min(3.0, 1.2*2=2.4)=2.4 (clipped); r=1.1 -> 2.2; r=0.7 -> min(1.4, 1.6)=1.4
    # row 1: r=0.5 -> min(-0.5, 0.8*-1)=-0.8 (clipped); r=1.3 -> min(-1.3, -1.2)=-1.3; r=0.9 -> -0.9
    logp = _ratios_to_logp([[1.5, 1.1, 0.7], [0.5, 1.3, 0.9]])
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(logp, old, adv, torch.ones(2, 3), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(2.4 + 2.2 + 1.4 - 0.8 - 1.3 - 0.9) / 6)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 1.1, 0.7, 0.5, 1.3, 0.9)]
    assert m["approx_kl"].item() == pytest.approx(sum(k3) / 6)
    loss.backward()
    # d/dlogp of -r*A/N is -r*A/N where unclipped, 0 where the clipped term is active.
    expected = torch.tensor([[0.0, -2 * 1.1, -2 * 0.7], [0.0, 1.3, 0.9]], dtype=torch.float64) / 6
    torch.testing.assert_close(logp.grad, expected)


def test_policy_loss_asymmetric_clip_high() -> None:
    # clip range [0.8, 1.6]: r=1.5 with A=2 is no longer clipped -> 3.0
    logp = _ratios_to_logp([[1.5, 1.1, 0.7], [0.5, 1.3, 0.9]])
    loss, m = policy_loss(
        logp, torch.zeros(2, 3), torch.tensor([2.0, -1.0]), torch.ones(2, 3), 0.2, clip_eps_high=0.6
    )
    assert loss.item() == pytest.approx(-(3.0 + 2.2 + 1.4 - 0.8 - 1.3 - 0.9) / 6)
    assert m["clip_frac"].item() == pytest.approx(1 / 6)


def test_policy_loss_no_clip_when_ratio_in_range() -> None:
    logp = _ratios_to_logp([[1.1, 0.9], [1.0, 1.15]])
    loss, m = policy_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, -3.0]), torch.ones(2, 2), 0.2)
    assert loss.item() == pytest.approx(-(1.1 + 0.9 - 3.0 * 1.0 - 3.0 * 1.15) / 4)
    assert m["clip_frac"].item() == 0.0


def _masked_case(pad: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    logp = torch.tensor([[-1.0, -0.5, pad], [pad, -2.0, -0.1]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.4, -pad], [pad * 3, -2.2, -0.3]])
    ref = torch.tensor([[-0.9, -0.7, pad], [-pad, -1.5, -0.2]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    entropy = torch.tensor([[1.0, 2.0, pad], [pad, 3.0, 4.0]])
    cfg = AlgoConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = grpo_loss(logp, old, ref, torch.tensor([1.5, -0.5]), mask, cfg, entropy)
    loss.backward()
    return loss, logp.grad, metrics  # type: ignore[return-value]


def test_padding_changes_nothing_including_grads() -> None:
    loss_a, grad_a, m_a = _masked_case(0.0)
    loss_b, grad_b, m_b = _masked_case(1e4)  # exp(1e4) would be inf if padding leaked in
    assert torch.isfinite(loss_b)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)
    assert grad_a[0, 2] == 0 and grad_a[1, 0] == 0
    for key in m_a:
        assert torch.equal(m_a[key], m_b[key]), key


def test_aggregate_token_mean_vs_seq_mean() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(10 / 4)
    # per-sequence means 2 and 4; the empty third sequence is not counted
    assert aggregate(values, mask, "seq_mean").item() == pytest.approx(3.0)
    assert aggregate(values, mask, "token_mean", normalizer=8).item() == pytest.approx(10 / 8)
    assert aggregate(values, mask, "seq_mean", normalizer=4).item() == pytest.approx(6 / 4)


def test_aggregate_empty_mask_is_zero_not_nan() -> None:
    values = torch.tensor([[float("nan"), float("inf")]], requires_grad=True)
    for mode in ("token_mean", "seq_mean"):
        out = aggregate(values, torch.zeros(1, 2), mode)
        assert out.item() == 0.0
        out.backward()
        assert torch.equal(values.grad, torch.zeros(1, 2))
        values.grad = None


@pytest.mark.parametrize(
    ("estimator", "lr_pos", "lr_neg"),
    [
        ("k1", LN2, -LN2),
        ("k2", 0.5 * LN2**2, 0.5 * LN2**2),
        ("k3", 0.5 + LN2 - 1, 2.0 - LN2 - 1),  # exp(ref - logp) - (ref - logp) - 1
    ],
)
def test_kl_estimators_on_known_numbers(estimator: str, lr_pos: float, lr_neg: float) -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    out = kl_penalty(logp, ref, estimator)
    torch.testing.assert_close(out, torch.tensor([[lr_pos, lr_neg]], dtype=torch.float64))


def _grpo_inputs() -> tuple[torch.Tensor, ...]:
    logp = torch.tensor([[0.5, 0.5], [0.25, 0.25]]).log()
    ref = torch.tensor([[0.25, 0.25], [0.5, 0.5]]).log()  # k3: 0.193147 row 0, 0.306853 row 1
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    return logp, ref, entropy, torch.tensor([1.0, 0.5])


def test_grpo_loss_combines_terms_token_mean() -> None:
    logp, ref, entropy, adv = _grpo_inputs()
    cfg = AlgoConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.02)
    loss, m = grpo_loss(logp, logp.clone(), ref, adv, torch.ones(2, 2), cfg, entropy)
    # ratio 1: pg = -(1 + 1 + 0.5 + 0.5) / 4 = -0.75; kl mean = 0.25; entropy mean = 2.5
    assert m["pg_loss"].item() == pytest.approx(-0.75)
    assert m["kl"].item() == pytest.approx(0.25, abs=1e-6)
    assert m["entropy"].item() == pytest.approx(2.5)
    assert m["clip_frac"].item() == 0.0
    assert loss.item() == pytest.approx(-0.75 + 0.1 * 0.25 - 0.02 * 2.5, abs=1e-6)
    assert m["loss"].item() == loss.item()


def test_grpo_loss_seq_mean_aggregates_every_term() -> None:
    logp, ref, entropy, adv = _grpo_inputs()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cfg = AlgoConfig(kl_coef=0.1, loss_agg="seq_mean", entropy_coef=0.02)
    loss, m = grpo_loss(logp, logp.clone(), ref, adv, mask, cfg, entropy)
    assert m["pg_loss"].item() == pytest.approx(-(1.0 + 0.5) / 2)
    assert m["kl"].item() == pytest.approx((0.5 + LN2 - 1 + 2.0 - LN2 - 1) / 2, abs=1e-6)
    assert m["entropy"].item() == pytest.approx((1.5 + 3.0) / 2)
    cfg_tok = AlgoConfig(kl_coef=0.1, loss_agg="token_mean", entropy_coef=0.02)
    _, m_tok = grpo_loss(logp, logp.clone(), ref, adv, mask, cfg_tok, entropy)
    assert m_tok["pg_loss"].item() == pytest.approx(-(1.0 + 1.0 + 0.5) / 3)
    assert m_tok["entropy"].item() == pytest.approx(2.0)


def test_grpo_loss_kl_gradient_k1() -> None:
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    cfg = AlgoConfig(kl_coef=0.5, kl_estimator="k1")
    loss, _ = grpo_loss(logp, torch.zeros(2, 3), torch.full((2, 3), -1.0), torch.zeros(2), mask, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(0.5)  # 0.5 * mean(0 - (-1))
    torch.testing.assert_close(logp.grad, mask * 0.5 / 5)


def test_grpo_loss_without_reference_when_kl_off() -> None:
    logp = torch.zeros(1, 2)
    cfg = AlgoConfig(kl_coef=0.0)
    loss, m = grpo_loss(logp, logp, None, torch.tensor([2.0]), torch.ones(1, 2), cfg)
    assert loss.item() == pytest.approx(-2.0)
    assert m["kl"].item() == 0.0 and m["entropy"].item() == 0.0


def test_sft_loss() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 99.0]])
    assert sft_loss(logp, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5 * LN2)


def test_errors_name_the_field() -> None:
    logp = torch.zeros(2, 3)
    ones = torch.ones(2, 3)
    with pytest.raises(ValueError, match="ref_logp is None but algo.kl_coef"):
        grpo_loss(logp, logp, None, torch.zeros(2), ones, AlgoConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy is None but algo.entropy_coef"):
        grpo_loss(logp, logp, logp, torch.zeros(2), ones, AlgoConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, logp, torch.zeros(2, 4), ones, 0.2)  # neither [B] nor [B, T]
    with pytest.raises(ValueError, match="mask must have shape"):
        policy_loss(logp, logp, torch.zeros(2), torch.ones(3, 2), 0.2)
    with pytest.raises(ValueError, match="algo.kl_estimator"):
        kl_penalty(logp, logp, "k9")
    with pytest.raises(ValueError, match="algo.loss_agg"):
        aggregate(logp, ones, "sum")


# Contract tests: every registered entry, including ones added later, must pass these.


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_kl_estimator_contract(name: str) -> None:
    lr = torch.tensor([[-20.0, -1.0, 0.0, 1.0, 20.0]])
    out = KL_ESTIMATORS[name](lr)
    assert out.shape == lr.shape
    assert out[0, 2].item() == 0.0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregator_contract(name: str) -> None:
    mask = torch.tensor([[True, False, True], [False, False, False]])
    values = torch.tensor([[2.5, float("nan"), 2.5], [float("inf"), 1.0, 1.0]])
    assert aggregate(values, mask, name).item() == 2.5  # constant c under the mask -> c
    assert aggregate(values, torch.zeros(2, 3, dtype=torch.bool), name).item() == 0.0


def test_register_kl_estimator() -> None:
    register_kl_estimator("abs", lambda lr: lr.abs())
    try:
        out = kl_penalty(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.0]]), "abs")
        assert out.tolist() == [[0.5, 1.0]]
        with pytest.raises(ValueError, match="already registered"):
            register_kl_estimator("abs", lambda lr: lr)
    finally:
        KL_ESTIMATORS.pop("abs")
