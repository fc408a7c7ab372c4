"""One routed expert as one contiguous blob, and the math of one expert.

A blob holds the expert's gate and up projections (2I, D) followed by its down projection (D, I),
so moving an expert between tiers is a single copy, and a stack of blobs (n, 3·I·D) is a layer's
worth of slots. This module does not route (models/common.py) nor cache (expert_cache.py).
"""

import torch
import torch.nn.functional as F


class ExpertLayout:
    """Shapes of one expert's matrices inside its blob."""

    def __init__(self, hidden: int, intermediate: int):
        self.D, self.I = hidden, intermediate
        self.numel = 3 * intermediate * hidden

    def gate_up(self, blob: torch.Tensor) -> torch.Tensor:
        return blob[..., : 2 * self.I * self.D].unflatten(-1, (2 * self.I, self.D))

    def down(self, blob: torch.Tensor) -> torch.Tensor:
        return blob[..., 2 * self.I * self.D :].unflatten(-1, (self.D, self.I))


def expert_forward(x, gate_up, down, act):
    """One SwiGLU expert on the tokens routed to it: x (n, D) -> (n, D)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act(gate) * up, down)
