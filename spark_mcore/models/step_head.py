"""MetaStone-S1's SPRM step-scoring head (arXiv 2507.01951): Linear(C -> 2C) - ReLU -
Dropout(0.5) - Linear(2C -> 1) on the policy's second-to-last hidden state at each step end.

The head reads the backbone's hidden states through `scale_gradient`, so the backbone receives
the head's gradient scaled by `backbone_grad_scale` (1e-4 in the paper) while the head itself
trains at full scale (the paper gives it its own AdamW, lr 1e-5, wd 1e-2, clip 1.0). Losses,
labels and selection are pure functions in `spark_mcore.algo.step_head`.

The actor builds it with `model.step_head=true` (spark_mcore.trainer.step_head: the hook on
the second-to-last layer, TP replication, DP-averaged gradients, its optimizer, checkpoints);
`save_step_head` / `load_step_head` write and read the exported `step_head.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from spark_mcore.algo.step_head import scale_gradient


class StepHead(nn.Module):
    """Scores hidden states [..., C] -> step logits [...]."""

    def __init__(self, hidden_size: int, dropout: float = 0.5, backbone_grad_scale: float = 1e-4) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if not 0.0 <= dropout < 1.0 or backbone_grad_scale < 0:
            raise ValueError(f"dropout must be in [0, 1) and backbone_grad_scale >= 0, got {dropout}, "
                             f"{backbone_grad_scale}")
        self.backbone_grad_scale = backbone_grad_scale
        self.net = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * hidden_size, 1))

    def forward(self, hidden: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """hidden [..., C] -> logits [...]. With `generator` (training), the dropout mask is
        drawn from it, so that replicas (TP ranks) that share its seed drop the same units."""
        x = scale_gradient(hidden, self.backbone_grad_scale)
        if generator is None or not self.training:
            return self.net(x).squeeze(-1)
        first, act, drop, last = self.net
        h = act(first(x))
        if drop.p > 0:
            keep = torch.rand(h.shape, generator=generator, device=h.device) >= drop.p
            h = h * keep.to(h.dtype) / (1.0 - drop.p)
        return last(h).squeeze(-1)

    def init_weights(self, seed: int) -> None:
        """torch's default Linear init, drawn from a generator seeded with `seed` (every replica
        that passes the same seed gets the same head, whatever its global RNG state)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.net[0], self.net[3]):
                bound = 1.0 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) and the bias bound
                layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=gen))
                layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=gen))


HEAD_FILE = "step_head.safetensors"


def save_step_head(head: StepHead, out_dir: str | Path) -> Path:
    """Writes `<out_dir>/step_head.safetensors` (weights + hidden size and dropout as metadata)."""
    from safetensors.torch import save_file

    path = Path(out_dir) / HEAD_FILE
    state = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "hidden_size": str(head.net[0].in_features),
                                          "dropout": str(head.net[2].p)})
    return path


def load_step_head(path: str | Path) -> StepHead:
    """The head exported beside an HF model: `path` is the file or the export directory.
    Raises FileNotFoundError naming the path and the fix when there is none."""
    from safetensors import safe_open

    p = Path(path)
    p = p / HEAD_FILE if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no step head. Fix: train with model.step_head=true (the export then "
                                "writes step_head.safetensors beside the HF weights)")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    hidden = int(meta.get("hidden_size", state["net.0.weight"].shape[1]))
    head = StepHead(hidden, dropout=float(meta.get("dropout", 0.5)))
    head.load_state_dict(state)
    return head.eval()
