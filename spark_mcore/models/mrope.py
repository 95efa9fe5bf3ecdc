"""Multimodal rotary (M-RoPE) position ids of Qwen2-VL / Qwen2.5-VL, as pure tensor functions.

Every token has three positions (temporal, height, width). A text token has all three equal
and one more than the token before it. The tokens of an image (its `image_token_id` run, one
token per merged patch, row-major over the merged grid h' = h / merge, w' = w / merge) sit at
(start, start + row, start + col), start being the position the next text token would have
had; the text after the image continues at start + max(h', w'). Same result as transformers'
`Qwen2_5_VLModel.get_rope_index` for images (no video: videos are not taken).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _image_positions(start: int, grid_thw: Tensor, merge: int) -> Tensor:
    """[3, t * h' * w'] positions of one image whose first token gets `start`."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // merge, w // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _row_positions(ids: Tensor, image_token_id: int, grids: list[Tensor],
                   merge: int) -> tuple[Tensor, int]:
    """positions [3, n] of one row's real tokens and the number of images it used."""
    is_image = (ids == image_token_id).tolist()
    pieces: list[Tensor] = []
    pos, i, used, n = 0, 0, 0, len(is_image)
    while i < n:
        j = i
        while j < n and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:  # one or more adjacent images: take images until the run is covered
            covered = 0
            while covered < j - i:
                if used >= len(grids):
                    raise ValueError(f"{j - i - covered} image tokens have no image_grid_thw row "
                                     f"left ({len(grids)} images given)")
                grid = grids[used]
                used += 1
                block = _image_positions(pos, grid, merge)
                pieces.append(block)
                covered += block.shape[1]
                pos += max(int(grid[1]), int(grid[2])) // merge
            if covered != j - i:
                raise ValueError(f"an image-token run of {j - i} tokens does not match the image "
                                 f"grids (they give {covered} tokens)")
        i = j
    out = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return out, used


def mrope_position_ids(input_ids: Tensor, image_grid_thw: Tensor | None, image_token_id: int,
                       spatial_merge_size: int,
                       attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """M-RoPE positions of a batch.

    input_ids      [B, T] long; images of all rows in `image_grid_thw` in row-major order.
    image_grid_thw [N, 3] long (t, h, w in patches, before merging) or None (text only).
    attention_mask [B, T] (1 = real token) or None; masked tokens get position 0.
    Returns (position_ids [3, B, T] long, deltas [B] long) with deltas = max position + 1 -
    number of real tokens: a token generated after the row sits at its index + delta.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    grids = list(image_grid_thw.cpu()) if image_grid_thw is not None else []
    b, t = input_ids.shape
    out = torch.zeros(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    mask = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(b, t, dtype=torch.bool)
    for row in range(b):
        pos, used = _row_positions(ids_cpu[row][mask[row]], image_token_id, grids, spatial_merge_size)
        grids = grids[used:]
        out[:, row, mask[row]] = pos
        if pos.numel():
            deltas[row] = int(pos.max()) + 1 - pos.shape[1]
    if grids:
        raise ValueError(f"{len(grids)} image_grid_thw rows have no image tokens in input_ids")
    return out.to(input_ids.device), deltas.to(input_ids.device)
