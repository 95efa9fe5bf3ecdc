"""Chunked log-probs / entropy against torch.log_softmax, plus memory and masking invariants."""

from __future__ import annotations

import math

import pytest
import torch

from spark_mcore.algo.logprobs import token_entropy, token_logprobs, vocab_parallel_logprobs


def _reference(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _ref_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def _case(seed: int = 0, shape: tuple[int, int, int] = (3, 7, 50)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    labels = torch.randint(0, shape[-1], shape[:2], generator=g)
    weights = torch.randn(shape[:2], generator=g)
    return logits, labels, weights


def test_hand_computed_two_token_vocab() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax = [0.25, 0.75]
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-7)
    ent = token_entropy(logits)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_log_softmax(chunk_size: int | None, temperature: float) -> None:
    logits, labels, w = _case()
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, labels, chunk_size=chunk_size, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    (out * w).sum().backward()
    x_ref = logits.clone().requires_grad_()
    ref = _reference(x_ref, labels, temperature)
    (ref * w).sum().backward()
    assert (out - ref).abs().max().item() <= 1e-6
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-6


def test_non_contiguous_sequence_first_logits() -> None:
    logits, labels, w = _case(1)
    sbv = logits.transpose(0, 1).contiguous().requires_grad_()  # Megatron's [S, B, V] layout
    out = token_logprobs(sbv.transpose(0, 1), labels, chunk_size=3)
    (out * w).sum().backward()
    x_ref = logits.clone().requires_grad_()
    (_reference(x_ref, labels) * w).sum().backward()
    assert (out - _reference(logits, labels)).abs().max().item() <= 1e-6
    assert (sbv.grad.transpose(0, 1) - x_ref.grad).abs().max().item() <= 1e-6


def test_bf16_logits() -> None:
    logits, labels, w = _case(2)
    bf = logits.bfloat16().requires_grad_()
    out = token_logprobs(bf, labels, chunk_size=5)
    assert out.dtype == torch.float32
    (out * w).sum().backward()
    assert bf.grad.dtype == torch.bfloat16
    ref_in = bf.detach().float().requires_grad_()  # same bf16 values, fp32 math
    ref = _reference(ref_in, labels)
    (ref * w).sum().backward()
    assert (out - ref).abs().max().item() <= 1e-5
    # ours: fp32 gradient rounded once to bf16
    torch.testing.assert_close(bf.grad, ref_in.grad.bfloat16(), rtol=0, atol=0)


def test_input_is_not_modified_and_no_full_size_tensor_is_saved() -> None:
    logits, labels, _ = _case(3, (2, 16, 64))
    x = logits.clone().requires_grad_()
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(x, labels, chunk_size=4)
        ent = token_entropy(x, chunk_size=4)
    (out.sum() + ent.sum()).backward()
    assert torch.equal(x.detach(), logits)
    # Only the input logits themselves (no copy) and per-token vectors are kept for backward.
    big = [s for s in saved if s.numel() >= x.numel()]
    assert big == [x.shape, x.shape]
    assert all(s.numel() <= 32 for s in saved if s.numel() < x.numel())


def test_ignore_index_gives_zero_value_and_grad() -> None:
    logits, labels, _ = _case(4)
    labels[0, 2] = -100
    labels[2, 0] = -100
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, labels, chunk_size=2)
    out.sum().backward()
    assert out[0, 2].item() == 0.0 and out[2, 0].item() == 0.0
    assert torch.equal(x.grad[0, 2], torch.zeros(50)) and torch.equal(x.grad[2, 0], torch.zeros(50))
    keep = labels != -100
    assert (out[keep] - _reference(logits, labels.clamp(min=0))[keep]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_entropy_values_and_grads(temperature: float) -> None:
    logits, _, w = _case(5)
    x = logits.clone().requires_grad_()
    ent = token_entropy(x, chunk_size=3, temperature=temperature)
    (ent * w).sum().backward()
    x_ref = logits.clone().requires_grad_()
    ref = _ref_entropy(x_ref, temperature)
    (ref * w).sum().backward()
    assert (ent - ref).abs().max().item() <= 1e-5
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-6
    with torch.no_grad():
        assert not token_entropy(logits.bfloat16()).requires_grad


def test_masked_vocab_entries_at_minus_inf() -> None:
    logits, labels, _ = _case(6, (1, 4, 10))
    logits[..., 7:] = float("-inf")
    labels = labels % 7
    x = logits.clone().requires_grad_()
    ent = token_entropy(x, chunk_size=2)
    lp = token_logprobs(x, labels, chunk_size=2)
    (ent.sum() + lp.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert (ent - _ref_entropy(logits[..., :7])).abs().max().item() <= 1e-5
    assert (lp - _reference(logits[..., :7], labels)).abs().max().item() <= 1e-6


def test_invalid_inputs_name_the_field() -> None:
    logits, labels, _ = _case()
    with pytest.raises(ValueError, match="labels must lie in"):
        token_logprobs(logits, torch.full_like(labels, 50))
    with pytest.raises(ValueError, match="labels must be \\[B, T\\]"):
        token_logprobs(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="labels must be an integer"):
        token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="logits must be a float \\[B, T, V\\]"):
        token_logprobs(logits[0], labels[0])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_logprobs(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="ignore_index must be < 0"):
        token_logprobs(logits, labels, ignore_index=0)
    with pytest.raises(ValueError, match="labels must lie in"):  # shard offset without a group
        vocab_parallel_logprobs(logits, labels, 5, None)
