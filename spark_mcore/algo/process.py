"""SPRO (arXiv 2507.01551): the policy's own process reward, as pure tensor functions.

Per-token process reward of response i at token j: beta * (log pi_theta - log pi_ref)(a_{i,j}).
Cumulative process reward R_{i,t} = beta * sum_{j<=t} (log pi_theta - log pi_ref)(a_{i,j}), a
constant (no gradient). Masked Step Advantage:

    MSA_{i,t} = R_{i,t} - mean{R_{k,t} : response k of i's group is still active at t}

(0 where only one response of the group is active at t; no std division). Token advantage =
the GRPO-normalised outcome advantage of the response + MSA_{i,t}.

"Position t" counts response tokens: the MSA compares the t-th response token of every member
of the group, so it is computed in the padded [responses, positions] layout (responses aligned
at their first token), never in a packed or prompt-offset layout. `to_response_layout` /
`from_response_layout` move [B, T] batch tensors (prompt + response, one contiguous run of
loss-mask 1 per row) into that layout and back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "TOKEN_ADVANTAGES",
    "cumulative_process_rewards",
    "from_response_layout",
    "masked_step_advantages",
    "spro_advantages",
    "spro_token_advantages",
    "to_response_layout",
]


def _check_layout(name: str, t: Tensor, like: Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} like the mask [N, L], "
                         f"got {tuple(t.shape)}")


def cumulative_process_rewards(logp: Tensor, ref_logp: Tensor, active: Tensor, beta: float) -> Tensor:
    """R_{i,t} = beta * cumsum_t (logp - ref_logp) over active positions; 0 where inactive.

    Args:
        logp, ref_logp: [N, L] log-probs of the response tokens under the policy that sampled
            them and under the fixed reference, response-aligned (t = 0 is the first token).
        active: [N, L] bool (or 0/1), True on the response's tokens (a prefix of each row).
        beta: the process-reward scale (algo.spro_beta).
    Returns:
        [N, L] float64, detached.
    """
    _check_layout("ref_logp", ref_logp, active)
    _check_layout("logp", logp, active)
    act = active.bool()
    zero = torch.zeros((), dtype=torch.float64)
    diff = torch.where(act, logp.detach().double() - ref_logp.detach().double(), zero)
    return torch.where(act, beta * diff.cumsum(dim=1), zero)


def masked_step_advantages(rewards: Tensor, active: Tensor, group_ids: Tensor) -> Tensor:
    """MSA_{i,t} = R_{i,t} - mean of R_{k,t} over k in i's group active at t (0 if only i is).

    Args:
        rewards: [N, L] cumulative process rewards (`cumulative_process_rewards`).
        active: [N, L] bool, True where response i still has a token at position t.
        group_ids: [N] integer, any values; equal ids = same prompt group.
    Returns:
        [N, L] float64; 0 where inactive and where fewer than two members are active.
    """
    _check_layout("rewards", rewards, active)
    if group_ids.shape != rewards.shape[:1] or group_ids.dtype.is_floating_point:
        raise ValueError(f"group_ids must be an integer [N] = {tuple(rewards.shape[:1])}, got "
                         f"{group_ids.dtype} {tuple(group_ids.shape)}; pass one group id per response")
    act = active.bool()
    if rewards.numel() == 0:
        return torch.zeros(rewards.shape, dtype=torch.float64, device=rewards.device)
    _, index = torch.unique(group_ids, return_inverse=True)
    groups = int(index.max()) + 1
    r = torch.where(act, rewards.double(), torch.zeros((), dtype=torch.float64))
    width = r.shape[1]
    sums = r.new_zeros(groups, width).index_add_(0, index, r)
    counts = r.new_zeros(groups, width).index_add_(0, index, act.double())
    mean = sums[index] / counts[index].clamp(min=1)
    shared = act & (counts[index] > 1)
    return torch.where(shared, r - mean, torch.zeros((), dtype=torch.float64))


def spro_advantages(outcome: Tensor, logp: Tensor, ref_logp: Tensor, active: Tensor, group_ids: Tensor,
                    beta: float) -> Tensor:
    """Token advantage outcome_i + MSA_{i,t} in the response-aligned layout; 0 where inactive.

    Args:
        outcome: [N] GRPO-normalised outcome advantage per response.
        logp, ref_logp, active: [N, L] as in `cumulative_process_rewards`.
        group_ids: [N] integer.
        beta: algo.spro_beta.
    Returns:
        [N, L] in the dtype of `outcome`.
    """
    if outcome.shape != active.shape[:1]:
        raise ValueError(f"outcome must be [N] = {tuple(active.shape[:1])}, got {tuple(outcome.shape)}")
    msa = masked_step_advantages(cumulative_process_rewards(logp, ref_logp, active, beta), active, group_ids)
    token = outcome.detach().double().unsqueeze(1) + msa
    return torch.where(active.bool(), token, torch.zeros((), dtype=torch.float64)).to(outcome.dtype)


def to_response_layout(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, T] batch tensors -> response-aligned [B, L] (L = longest response).

    Each row's mask must be one contiguous run of ones (the response); rows without any are
    all-inactive. Returns (aligned values [B, L], active [B, L] bool, start [B] long: the
    first response position of each row in the batch layout, 0 for empty rows).
    """
    _check_layout("values", values, mask)
    bmask = mask.bool()
    lengths = bmask.sum(dim=1)
    width = values.shape[1]
    pos = torch.arange(width, device=values.device)
    start = torch.where(bmask, pos, torch.full_like(pos, width)).amin(dim=1).clamp(max=width) * (lengths > 0)
    end = torch.where(bmask, pos + 1, torch.zeros_like(pos)).amax(dim=1)
    if bool(((end - start) != lengths).any()):
        raise ValueError("to_response_layout: a row's loss mask is not one contiguous run; SPRO needs each "
                         "response as one block of response tokens")
    span = int(lengths.max()) if lengths.numel() else 0
    t = torch.arange(span, device=values.device)
    active = t[None, :] < lengths[:, None]
    src = (start[:, None] + t[None, :]).clamp(max=max(width - 1, 0))
    aligned = torch.where(active, values.gather(1, src), values.new_zeros(()))
    return aligned, active, start


def from_response_layout(aligned: Tensor, active: Tensor, start: Tensor, width: int) -> Tensor:
    """Inverse of `to_response_layout`: [B, L] -> [B, width], 0 outside the responses."""
    out = torch.zeros(aligned.shape[0], width, dtype=aligned.dtype, device=aligned.device)
    if aligned.numel() == 0:
        return out
    dst = start[:, None] + torch.arange(aligned.shape[1], device=aligned.device)[None, :]
    dst = torch.where(active, dst, torch.full_like(dst, width))  # inactive -> a dropped extra column
    wide = torch.zeros(aligned.shape[0], width + 1, dtype=aligned.dtype, device=aligned.device)
    wide.scatter_(1, dst.clamp(max=width), torch.where(active, aligned, torch.zeros_like(aligned)))
    out.copy_(wide[:, :width])
    return out


def spro_token_advantages(outcome: Tensor, old_logp: Tensor, ref_logp: Tensor, loss_mask: Tensor,
                          group_ids: Tensor, beta: float) -> Tensor:
    """SPRO token advantages for a batch in the [B, T] prompt + response layout.

    Args:
        outcome: [B] GRPO-normalised outcome advantages.
        old_logp, ref_logp: [B, T] log-probs of the sampled tokens (policy at sampling time,
            reference), aligned with `loss_mask`.
        loss_mask: [B, T], one contiguous run of ones per row (the response tokens).
        group_ids: [B] integer prompt-group ids.
        beta: algo.spro_beta.
    Returns:
        [B, T] token advantages, 0 outside the responses.
    """
    logp, active, start = to_response_layout(old_logp, loss_mask)
    ref, _, _ = to_response_layout(ref_logp, loss_mask)
    token = spro_advantages(outcome, logp, ref, active, group_ids, beta)
    return from_response_layout(token, active, start, loss_mask.shape[1])


def _grpo_token_advantages(outcome: Tensor, old_logp: Tensor, ref_logp: Tensor | None, loss_mask: Tensor,
                           group_ids: Tensor, beta: float) -> Tensor:
    return outcome  # per-sequence [B]: the loss broadcasts it over the tokens


# algo.advantage -> (outcome [B], old_logp [B, T], ref_logp [B, T] | None, loss_mask [B, T],
# group_ids [B], spro_beta) -> advantages [B] or [B, T]. Entries other than "grpo" need
# reference log-probs (AlgoConfig.needs_reference).
TokenAdvantageFn = Callable[[Tensor, Tensor, "Tensor | None", Tensor, Tensor, float], Tensor]
TOKEN_ADVANTAGES: dict[str, TokenAdvantageFn] = {
    "grpo": _grpo_token_advantages,
    "spro": spro_token_advantages,  # type: ignore[dict-item]
}
