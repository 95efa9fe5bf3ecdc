"""Image inputs of a vision-language model's forward (family-agnostic)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisionInputs:
    """The images of a batch, in the order their image-pad tokens appear (row-major).

    pixel_values   [P, C * temporal_patch * patch * patch] float: flattened patches of all
                   images (the Qwen2.5-VL processor's output).
    image_grid_thw [N, 3] long: (t, h, w) in patches of each image; sum(t*h*w) == P.
    """

    pixel_values: Tensor
    image_grid_thw: Tensor

    def to(self, device: torch.device | str) -> VisionInputs:
        return VisionInputs(self.pixel_values.to(device), self.image_grid_thw.to(device))

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Tensor, Tensor] | None]) -> VisionInputs | None:
        """Concatenate per-row (pixel_values, image_grid_thw) in row order; None if no row has
        images."""
        present = [r for r in rows if r is not None]
        if not present:
            return None
        return cls(torch.cat([pv for pv, _ in present]), torch.cat([g for _, g in present]))


# transformers >= 5 names a VL model's tensors in memory as `model.visual.*` /
# `model.language_model.*`; checkpoints on the hub (and save_pretrained) as `visual.*` / `model.*`.
_HF_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_hf_name(name: str) -> str:
    """An HF tensor name in the hub's spelling (`model.visual.x` -> `visual.x`,
    `model.language_model.x` -> `model.x`); other names unchanged."""
    for new, hub in _HF_ALIASES:
        if name.startswith(new):
            return hub + name[len(new):]
    return name
