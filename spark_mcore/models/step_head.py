"""MetaStone-S1's SPRM step-scoring head (arXiv 2507.01951): Linear(C -> 2C) - ReLU -
Dropout(0.5) - Linear(2C -> 1) on the policy's second-to-last hidden state at each step end.

The head reads the backbone's hidden states through `scale_gradient`, so the backbone receives
the head's gradient scaled by `backbone_grad_scale` (1e-4 in the paper) while the head itself
trains at full scale (the paper gives it its own AdamW, lr 1e-5, wd 1e-2, clip 1.0). Losses,
labels and selection are pure functions in `spark_mcore.algo.step_head`.

Not yet built by the actor: no `model.step_head` setting, TP replication, checkpointing or
export exists yet.
"""

from __future__ import annotations

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

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(scale_gradient(hidden, self.backbone_grad_scale)).squeeze(-1)
