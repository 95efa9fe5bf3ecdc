"""Turning verified rollouts into padded training tensors and splitting them into micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from spark_mcore.types import Prompt, Rollout, RolloutGroup, TrainBatch, prompt_kind


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0,
                   pad_to_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads prompt+response pairs.

    Returns tokens [B, T] long and loss_mask [B, T] float, 1.0 exactly on response positions.
    T is the longest pair rounded up to `pad_to_multiple` (pipeline parallelism needs one T).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=False)]
    width = max(lengths, default=1)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=False)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p): len(p) + len(r)] = 1.0
    return tokens, mask


# The processed images of a prompt (pixel_values, image_grid_thw), None for a text prompt.
ImagesOf = Callable[[Prompt], "tuple[torch.Tensor, torch.Tensor] | None"]
# The step positions of a response's token ids (response-relative), for the SPRM step head.
StepsOf = Callable[[list[int]], list[int]]


def step_labels(rollouts: list[Rollout], steps_of: StepsOf) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S] long step positions in the prompt+response row, -1 padded; [B] float outcomes).
    Only policy responses get steps: a recycled reward task's response is a judgement or a
    revision, not a solution whose outcome labels its steps."""
    rows = [[len(r.prompt_ids) + p for p in steps_of(r.completion.token_ids)]
            if prompt_kind(r.prompt) == "policy" else [] for r in rollouts]
    width = max((len(x) for x in rows), default=0)
    pos = torch.full((len(rollouts), max(width, 1)), -1, dtype=torch.long)
    for i, x in enumerate(rows):
        pos[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return pos, torch.tensor([float(r.correct) for r in rollouts], dtype=torch.float32)


def rollouts_to_batch(rollouts: list[Rollout], advantages: torch.Tensor, pad_id: int = 0,
                      pad_to_multiple: int = 1, images_of: ImagesOf | None = None,
                      steps_of: StepsOf | None = None, with_prefix_mask: bool = False) -> TrainBatch:
    """advantages [N] aligns with `rollouts`; kinds record the task kind for per-kind metrics.
    steps_of: the step finder of the SPRM step head (sets step_positions and outcomes).
    images_of: the processed images of a rollout's prompt (vision-language models); SPARK's
    judge and reflection prompts carry their source prompt's images, so they get them too.
    with_prefix_mask: set `prefix_mask` (Prefix-RFT; all False for on-policy responses)."""
    tokens, mask = pack_sequences([r.prompt_ids for r in rollouts],
                                  [r.completion.token_ids for r in rollouts], pad_id, pad_to_multiple)
    kinds = [prompt_kind(r.prompt) for r in rollouts]
    images = [images_of(r.prompt) for r in rollouts] if images_of is not None else []
    steps, outcomes = step_labels(rollouts, steps_of) if steps_of is not None else (None, None)
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=advantages.float(), kinds=kinds,
                      engine_logprobs=engine_logprobs(rollouts, tokens.shape),
                      prefix_mask=prefix_mask(rollouts, tokens.shape) if with_prefix_mask else None,
                      images=images if any(i is not None for i in images) else [],
                      step_positions=steps, outcomes=outcomes)


def prefix_mask(rollouts: list[Rollout], shape: torch.Size) -> torch.Tensor:
    """[B, T] bool: True on the first `completion.prefix_len` response tokens of each row (the
    demonstration prefix, Prefix-RFT), aligned with the tokens like loss_mask."""
    out = torch.zeros(shape, dtype=torch.bool)
    for i, r in enumerate(rollouts):
        n = r.completion.prefix_len
        if not 0 <= n <= len(r.completion.token_ids):
            raise ValueError(f"rollout {i}: prefix_len={n} outside its {len(r.completion.token_ids)} response tokens")
        start = len(r.prompt_ids)
        out[i, start:start + n] = True
    return out


def engine_logprobs(rollouts: list[Rollout], shape: torch.Size) -> torch.Tensor | None:
    """[B, T] the engine's log-prob of each response token at its position (as old_logprobs);
    None unless every completion carries one log-prob per token."""
    if not rollouts or any(r.completion.logprobs is None or len(r.completion.logprobs) != len(r.completion.token_ids)
                           for r in rollouts):
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for i, r in enumerate(rollouts):
        start = len(r.prompt_ids)
        out[i, start:start + len(r.completion.token_ids)] = torch.tensor(r.completion.logprobs, dtype=torch.float32)
    return out


def sampled_mask(batch: TrainBatch) -> torch.Tensor:
    """[B, T] float: loss_mask without the demonstration-prefix tokens (those the engine sampled)."""
    if batch.prefix_mask is None:
        return batch.loss_mask
    return batch.loss_mask * (~batch.prefix_mask.bool()).to(batch.loss_mask.dtype)


def select(batch: TrainBatch, index: torch.Tensor | slice) -> TrainBatch:
    """Rows `index` of every per-sequence tensor of the batch."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[index]

    kinds = batch.kinds
    if kinds:
        rows = range(batch.num_sequences)[index] if isinstance(index, slice) else index.tolist()
        kinds = [batch.kinds[i] for i in rows]
    images = batch.images
    if images:
        rows = range(batch.num_sequences)[index] if isinstance(index, slice) else index.tolist()
        images = [batch.images[i] for i in rows]
    return replace(batch, tokens=batch.tokens[index], loss_mask=batch.loss_mask[index],
                   advantages=batch.advantages[index], old_logprobs=pick(batch.old_logprobs),
                   ref_logprobs=pick(batch.ref_logprobs), kinds=kinds, group_ids=pick(batch.group_ids),
                   engine_logprobs=pick(batch.engine_logprobs), prefix_mask=pick(batch.prefix_mask),
                   images=images, step_positions=pick(batch.step_positions), outcomes=pick(batch.outcomes))


def micro_batches(batch: TrainBatch, micro_batch_size: int) -> Iterator[TrainBatch]:
    for start in range(0, batch.num_sequences, micro_batch_size):
        yield select(batch, slice(start, start + micro_batch_size))


def pad_rows(batch: TrainBatch, multiple: int) -> TrainBatch:
    """Appends all-padding rows (mask 0, advantage 0) until the row count divides `multiple`."""
    extra = -batch.num_sequences % multiple
    if extra == 0:
        return batch

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

    return replace(batch, tokens=grow(batch.tokens), loss_mask=grow(batch.loss_mask),
                   advantages=grow(batch.advantages), old_logprobs=grow(batch.old_logprobs),
                   ref_logprobs=grow(batch.ref_logprobs), kinds=batch.kinds + ["pad"] * extra if batch.kinds else [],
                   engine_logprobs=grow(batch.engine_logprobs), prefix_mask=grow(batch.prefix_mask),
                   group_ids=None if batch.group_ids is None else torch.cat(
                       [batch.group_ids, batch.group_ids.new_full((extra,), -1)]),
                   images=batch.images + [None] * extra if batch.images else [],
                   step_positions=None if batch.step_positions is None else torch.cat(
                       [batch.step_positions, batch.step_positions.new_full((extra, batch.step_positions.shape[1]), -1)]),
                   outcomes=grow(batch.outcomes))


def dp_slice(batch: TrainBatch, dp_rank: int, dp_size: int) -> TrainBatch:
    """DP rank `dp_rank`'s rows of a global batch: the batch is padded with empty rows (mask 0,
    advantage 0: they add nothing to the loss or its normaliser) to a multiple of `dp_size`
    and cut into equal contiguous slices, so every DP rank runs the same number of
    micro-batches. The actor normalises the loss over all DP ranks (`_global_norm`), so the
    DP slices together take the step world size 1 takes on the whole batch."""
    if dp_size == 1:
        return batch
    padded = pad_rows(batch, dp_size)
    per = padded.num_sequences // dp_size
    return select(padded, slice(dp_rank * per, (dp_rank + 1) * per))


def split_for_updates(batch: TrainBatch, updates: int, seed: int | None = None) -> list[TrainBatch]:
    """Splits a policy step's batch into `updates` mini-batches of near-equal size.

    Contiguous when `seed` is None; otherwise the rows are shuffled first (seeded, so a resumed
    run splits identically), which mixes the groups of one prompt over the mini-batches.
    """
    n = batch.num_sequences
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = [round(i * n / updates) for i in range(updates + 1)]
    return [select(batch, order[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def groups_to_batch(groups: list[RolloutGroup], eps: float, normalize_std: bool,
                    filter_zero_variance: bool, pad_id: int = 0,
                    images_of: ImagesOf | None = None, prefix: bool = False,
                    steps_of: StepsOf | None = None) -> tuple[TrainBatch | None, dict[str, float]]:
    """GRPO batch from verified groups: group-normalised advantages per rollout.

    With `filter_zero_variance`, groups whose rewards are all equal are dropped (their advantages
    are 0, so they only dilute the token mean). Returns (None, stats) when nothing is left.
    `prefix` (rollout.prefix.enabled): the batch carries `prefix_mask`, and a group with a
    member that continued a demonstration prefix takes Dr. GRPO's baseline (r - mean, no std:
    Prefix-RFT) whatever `normalize_std` says.
    """
    from spark_mcore.algo.advantages import grpo_advantages, zero_variance_groups

    rollouts = [r for g in groups for r in g.rollouts]
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    group_ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.rollouts], dtype=torch.long)
    flat = zero_variance_groups(rewards, group_ids)
    stats = {"zero_variance_groups": float(len(set(group_ids[flat].tolist()))) if len(rollouts) else 0.0}
    adv = grpo_advantages(rewards, group_ids, eps=eps, normalize_std=normalize_std)
    if prefix:
        prefixed = torch.tensor([any(r.completion.prefix_len > 0 for r in g.rollouts) for g in groups
                                 for _ in g.rollouts], dtype=torch.bool)
        if bool(prefixed.any()):
            adv = torch.where(prefixed, grpo_advantages(rewards, group_ids, normalize_std=False), adv)
    keep = ~flat if filter_zero_variance else torch.ones_like(flat)
    if not bool(keep.any()):
        return None, stats
    kept = [r for r, k in zip(rollouts, keep.tolist(), strict=False) if k]
    batch = rollouts_to_batch(kept, adv[keep], pad_id=pad_id, images_of=images_of, with_prefix_mask=prefix,
                              steps_of=steps_of)
    batch.group_ids = group_ids[keep]
    return batch, stats
