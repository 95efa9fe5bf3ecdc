"""SPRM (MetaStone-S1) step head: positions, label filter, class weights, weighted BCE, the 1e-4
gradient scaling into the backbone and geometric-mean best-of-N, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from spark_mcore.algo.step_head import (
    agreement_filter,
    best_of_n,
    class_weights,
    gather_step_states,
    geometric_mean_scores,
    scale_gradient,
    step_bce_loss,
    step_positions,
)
from spark_mcore.models.step_head import StepHead

DELIM = [7, 8]  # e.g. the ids of "." and "\n\n"


def test_step_positions_before_each_delimiter() -> None:
    ids = torch.tensor([3, 4, 7, 8, 5, 7, 8, 6, 9])
    assert step_positions(ids, DELIM).tolist() == [1, 4]
    assert step_positions(ids, DELIM, include_end=True).tolist() == [1, 4, 8]
    ends = torch.tensor([3, 7, 8, 5, 7, 8])
    assert step_positions(ends, DELIM, include_end=True).tolist() == [0, 3]  # last step already ends
    assert step_positions(torch.tensor([7, 8, 2]), DELIM).tolist() == []  # nothing before it
    assert step_positions(torch.tensor([5]), DELIM, include_end=True).tolist() == [0]
    assert step_positions(torch.tensor([5, 7, 5]), [7]).tolist() == [0]  # one-token delimiter
    with pytest.raises(ValueError, match="non-empty"):
        step_positions(ids, [])


def test_gather_step_states() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    states, mask = gather_step_states(hidden, torch.tensor([[1, 3], [2, -1]]))
    assert mask.tolist() == [[True, True], [True, False]]
    assert states[0, 0].tolist() == hidden[0, 1].tolist() and states[0, 1].tolist() == hidden[0, 3].tolist()
    assert states[1, 0].tolist() == hidden[1, 2].tolist() and states[1, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=">= T"):
        gather_step_states(hidden, torch.tensor([[4, 0], [0, 0]]))


def test_agreement_filter_and_class_weights() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -0.3, 0.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    assert agreement_filter(logits, labels).tolist() == [True, False, False, True, True]
    # 3 positive, 5 negative of N = 8: positive 1.5 * 5 / 8 = 0.9375, negative 3 / 8 = 0.375
    assert class_weights(3, 5) == pytest.approx((0.9375, 0.375))
    assert class_weights(0, 0) == (0.0, 0.0)


def test_step_bce_loss_hand_computed() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -0.3], requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    keep = agreement_filter(logits, labels)  # steps 0 and 3 agree
    loss = step_bce_loss(logits, labels, keep, pos_weight=0.9375, neg_weight=0.375)
    # BCE(2, 1) = log(1 + e^-2); BCE(-0.3, 0) = log(1 + e^-0.3); mean over the 2 kept steps
    expected = (0.9375 * math.log1p(math.exp(-2.0)) + 0.375 * math.log1p(math.exp(-0.3))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert logits.grad.tolist() == pytest.approx([0.9375 * (sig(2.0) - 1) / 2, 0.0, 0.0, 0.375 * sig(-0.3) / 2])
    none = step_bce_loss(logits, labels, torch.zeros(4, dtype=torch.bool), 1.0, 1.0)
    assert none.item() == 0.0 and none.requires_grad


def test_head_shape_and_gradient_scale_into_backbone() -> None:
    torch.manual_seed(0)
    backbone = torch.nn.Linear(4, 4)
    x = torch.randn(3, 5, 4)
    grads = {}
    for scale in (1.0, 1e-4):
        head = StepHead(4, backbone_grad_scale=scale)
        torch.manual_seed(1)
        head.load_state_dict(StepHead(4).state_dict())  # the same head weights for both scales
        head.eval()  # no dropout: both passes see the same function
        backbone.zero_grad()
        logits = head(backbone(x))
        assert logits.shape == (3, 5)
        logits.sum().backward()
        grads[scale] = (backbone.weight.grad.clone(), head.net[0].weight.grad.clone())
    full, scaled = grads[1.0], grads[1e-4]
    torch.testing.assert_close(scaled[0], full[0] * 1e-4)  # the backbone gets 1e-4 of the gradient
    torch.testing.assert_close(scaled[1], full[1])  # the head trains at full scale
    assert [type(m).__name__ for m in StepHead(4).net] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert StepHead(4).net[0].out_features == 8 and StepHead(4).net[2].p == 0.5
    x2 = torch.ones(2, requires_grad=True)
    scale_gradient(x2, 0.0).sum().backward()
    assert x2.grad.tolist() == [0.0, 0.0]


def test_geometric_mean_and_best_of_n() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0], [math.log(3.0), math.log(3.0), 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    scores = geometric_mean_scores(logits, mask)
    # row 0: sqrt(0.5 * 0.5) = 0.5; row 1: (0.75 * 0.75 * 0.5)^(1/3); row 2: no steps -> 0
    assert scores.tolist() == pytest.approx([0.5, (0.75 * 0.75 * 0.5) ** (1 / 3), 0.0])
    assert best_of_n(scores).item() == 1
    assert best_of_n(torch.tensor([[0.2, 0.9, 0.9], [0.7, 0.1, 0.3]])).tolist() == [1, 0]  # first on ties
