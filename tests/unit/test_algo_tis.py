"""Truncated importance sampling and the engine/trainer log-prob mismatch, against hand-computed numbers."""

from __future__ import annotations

import math

import torch

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.algo.losses import grpo_loss, logprob_mismatch, policy_loss, tis_weights
from spark_mcore.trainer.batching import engine_logprobs
from spark_mcore.types import Completion, Prompt, Rollout

MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
OLD = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
ENGINE = torch.tensor([[0.0, -1.5, -1.0, -0.5]])  # old - engine = [., 0.5, -1.0, 0.0]


def test_tis_weights_truncate_at_the_cap_and_are_one_off_the_mask() -> None:
    w = tis_weights(OLD, ENGINE, MASK, cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.0, 1.5, math.exp(-1.0), 1.0]]))  # exp(0.5)=1.65 -> 1.5


def test_policy_loss_weighted_per_token() -> None:
    logp = OLD.clone().requires_grad_(True)  # ratio 1: surrogate = -A per token
    adv = torch.tensor([2.0])
    w = torch.tensor([[9.0, 1.5, 0.5, 1.0]])
    loss, _ = policy_loss(logp, OLD, adv, MASK, 0.2, is_weights=w)
    assert math.isclose(float(loss), -2.0 * (1.5 + 0.5 + 1.0) / 3, rel_tol=1e-6)


def test_grpo_loss_applies_tis_only_with_engine_logprobs_and_a_cap() -> None:
    cfg = AlgoConfig(kl_coef=0.0, tis_cap=2.0)
    adv = torch.tensor([1.0])
    plain, _ = grpo_loss(OLD.clone(), OLD, None, adv, MASK, cfg)
    tis, m = grpo_loss(OLD.clone(), OLD, None, adv, MASK, cfg, engine_logp=ENGINE)
    weights = [math.exp(0.5), math.exp(-1.0), 1.0]
    assert math.isclose(float(plain), -1.0, rel_tol=1e-6)
    assert math.isclose(float(tis), -sum(weights) / 3, rel_tol=1e-6)
    assert math.isclose(float(m["tis_weight_mean"]), sum(weights) / 3, rel_tol=1e-6)
    off, _ = grpo_loss(OLD.clone(), OLD, None, adv, MASK, AlgoConfig(kl_coef=0.0, tis_cap=0.0), engine_logp=ENGINE)
    assert math.isclose(float(off), -1.0, rel_tol=1e-6)


def test_logprob_mismatch_mean_abs_and_k3() -> None:
    m = logprob_mismatch(OLD, ENGINE, MASK)
    d = [0.5, -1.0, 0.0]
    assert math.isclose(m["logprob_mismatch"], 1.5 / 3, rel_tol=1e-6)
    assert math.isclose(m["logprob_kl_k3"], sum(math.exp(x) - 1 - x for x in d) / 3, rel_tol=1e-6)


def test_engine_logprobs_sit_at_response_positions() -> None:
    p = Prompt("p", [{"role": "user", "content": "q"}], "1")
    rs = [Rollout(p, [7, 8], Completion([1, 2], "a", [-0.1, -0.2])), Rollout(p, [7], Completion([3], "b", [-0.3]))]
    out = engine_logprobs(rs, torch.Size([2, 4]))
    assert torch.allclose(out, torch.tensor([[0, 0, -0.1, -0.2], [0, -0.3, 0, 0]]))
    rs[1].completion.logprobs = None
    assert engine_logprobs(rs, torch.Size([2, 4])) is None
