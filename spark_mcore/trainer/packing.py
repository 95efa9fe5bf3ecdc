"""Micro-batches for megatron's forward-backward schedule: padded or packed (padding-free).

Both layouts give a list of `MicroBatch` of one input shape [R, L] (pipeline p2p needs a single
shape). Padded: row i is sequence i, right-padded to the batch's T. Packed: sequences are
placed first-fit-decreasing into rows of length L, each with positions restarting at 0 and a
block-diagonal causal mask (`spark_mcore.models.packed`); per-token outputs are unpacked back to
the [b, T] layout of the micro-batch's sequences, so losses never see the packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spark_mcore.models.packed import PackedRows
from spark_mcore.trainer.batching import micro_batches, pad_rows, select
from spark_mcore.types import TrainBatch


@dataclass
class MicroBatch:
    """One forward/backward unit of the schedule.

    seqs:   the micro-batch's sequences in the batch layout, TrainBatch [b, T] (loss inputs).
    index:  [b] long, their rows in the full batch; -1 marks padding rows (no sequence).
    tokens: [R, L] long, the model input (seqs.tokens itself when padded).
    packed: the packed layout, or None when row i is sequence i (padded).
    slots:  [b, 3] long (row, start, length) of each sequence in `tokens`; None when padded.
    """

    seqs: TrainBatch
    index: Tensor
    tokens: Tensor
    packed: PackedRows | None = None
    slots: Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return self.seqs.num_sequences

    def to(self, device: torch.device | str) -> MicroBatch:
        """Everything the forward and the loss read, on `device` (the model's)."""
        if self.tokens.device == torch.device(device):
            return self
        return MicroBatch(seqs=self.seqs.to(device), index=self.index.to(device), tokens=self.tokens.to(device),
                          packed=None if self.packed is None else self.packed.to(device),
                          slots=None if self.slots is None else self.slots.to(device))

    def unpack(self, values: Tensor) -> Tensor:
        """Per-token values [R, L, ...] in model layout -> [b, T, ...] in the batch layout.

        Positions past a sequence's length are 0. Packed: position 0 of each sequence is set to
        0 as well, because there the model layout holds a value computed from the previous
        sequence of the row (log-probs and entropies at t are read off the logits at t - 1).
        Differentiable (a gather).
        """
        if self.slots is None:
            return values
        b, width = self.seqs.tokens.shape
        row_len = self.tokens.shape[1]
        rows, starts, lengths = self.slots.to(values.device).unbind(1)
        t = torch.arange(width, device=values.device)
        valid = (t[None, :] < lengths[:, None]) & (t[None, :] > 0)        # [b, T]
        flat = (rows * row_len + starts)[:, None] + t[None, :]            # [b, T]
        flat = torch.where(valid, flat, torch.zeros_like(flat))
        picked = values.reshape(-1, *values.shape[2:])[flat.reshape(-1)].reshape(b, width, *values.shape[2:])
        shape = (b, width) + (1,) * (values.dim() - 2)
        return torch.where(valid.reshape(shape), picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def sequence_lengths(batch: TrainBatch) -> Tensor:
    """[B] long: tokens that matter per sequence = last position with loss_mask 1, plus one
    (at least 1). Trailing tokens after it never influence a scored position (causal model)."""
    width = batch.loss_mask.shape[1]
    pos = torch.arange(1, width + 1).expand_as(batch.loss_mask)
    last = torch.where(batch.loss_mask > 0, pos, torch.zeros_like(pos)).amax(dim=1)
    return last.clamp(min=1).long()


def plan_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's lengths summing <= row_length.

    Longest first (ties by index, so the plan is deterministic); each sequence goes into the
    first row with room, else opens a new row.
    """
    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise ValueError(f"sequence {too_long[0]} has {lengths[too_long[0]]} tokens > row length {row_length}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(row_length)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def _layout_rows(rows: list[list[int]], lengths: list[int], row_length: int
                 ) -> tuple[Tensor, Tensor, list[int], list[tuple[int, int, int]]]:
    """position_ids / segment_ids [R, L], segment lengths, and (row, start, length) per sequence
    in row order. A row's tail (or an empty row) is one padding segment."""
    positions = torch.zeros(len(rows), row_length, dtype=torch.long)
    segments = torch.zeros(len(rows), row_length, dtype=torch.long)
    seqlens: list[int] = []
    slots: list[tuple[int, int, int]] = []
    for r, members in enumerate(rows):
        start = 0
        for seg, i in enumerate([*members, None]):
            n = lengths[i] if i is not None else row_length - start
            if n == 0:
                break
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = seg
            seqlens.append(n)
            if i is not None:
                slots.append((r, start, n))
            start += n
    return positions, segments, seqlens, slots


def _packed_micro_batch(batch: TrainBatch, rows: list[list[int]], lengths: list[int],
                        row_length: int) -> MicroBatch:
    order = [i for members in rows for i in members]
    positions, segments, seqlens, slots = _layout_rows(rows, lengths, row_length)
    index = torch.tensor(order, dtype=torch.long)
    seqs = select(batch, index)
    tokens = torch.zeros(len(rows), row_length, dtype=batch.tokens.dtype)
    for k, (r, start, n) in enumerate(slots):
        tokens[r, start:start + n] = seqs.tokens[k, :n]
    packed = PackedRows(position_ids=positions, segment_ids=segments,
                        seqlens=torch.tensor(seqlens, dtype=torch.long))
    return MicroBatch(seqs=seqs, index=index, tokens=tokens, packed=packed,
                      slots=torch.tensor(slots, dtype=torch.long).reshape(-1, 3))


def packed_micro_batches(batch: TrainBatch, row_length: int, rows_per_micro_batch: int,
                         multiple: int = 1) -> list[MicroBatch]:
    """Packs `batch` into micro-batches of `rows_per_micro_batch` rows (at most the number of
    rows needed) of `row_length` tokens each.

    The last micro-batch is filled with empty rows, and empty micro-batches (no sequences) are
    appended until the count divides `multiple` (the interleaved pipeline schedule needs it).
    """
    lengths = sequence_lengths(batch).tolist()
    rows = plan_rows(lengths, row_length)
    rows_per_micro_batch = max(1, min(rows_per_micro_batch, len(rows)))
    rows += [[] for _ in range(-len(rows) % rows_per_micro_batch)]
    groups = [rows[k:k + rows_per_micro_batch] for k in range(0, len(rows), rows_per_micro_batch)]
    groups += [[[] for _ in range(rows_per_micro_batch)] for _ in range(-len(groups) % multiple)]
    return [_packed_micro_batch(batch, g, lengths, row_length) for g in groups]


def padded_micro_batches(batch: TrainBatch, size: int, multiple: int = 1) -> list[MicroBatch]:
    """Equal micro-batches of `size` right-padded rows; mask-0 padding rows fill the last one
    and, when needed, whole micro-batches until the count divides `multiple`."""
    count = -(-batch.num_sequences // size)
    count += -count % multiple
    full = pad_rows(batch, size * count)
    index = torch.arange(full.num_sequences)
    index[batch.num_sequences:] = -1
    return [MicroBatch(seqs=mb, index=index[k * size:(k + 1) * size], tokens=mb.tokens)
            for k, mb in enumerate(micro_batches(full, size))]


def packing_stats(batch: TrainBatch, micro_batches_: list[MicroBatch]) -> dict[str, float]:
    """Token positions the model processes (rows x length over all micro-batches) against the
    tokens that matter (`sequence_lengths`); their ratio is the padding overhead."""
    processed = sum(mb.tokens.numel() for mb in micro_batches_)
    real = int(sequence_lengths(batch).sum()) if batch.num_sequences else 0
    return {"tokens_processed": float(processed), "tokens_real": float(real)}
