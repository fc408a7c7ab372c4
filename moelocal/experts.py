"""Routed experts: their weights, one contiguous blob per expert, and the math of a MoE layer.

Per layer, the experts are stacked in one tensor (E, 3·I·D): row e holds expert e's gate and up
projections (2I, D) followed by its down projection (D, I). One expert is one slice, so moving an
expert between tiers is a single copy. This module does not route (models/common.py does) and
does not know where a blob came from (the loader fills it).
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


def moe_combine(x, ids, weights, expert_weights, act):
    """Sum over the K selected experts of weight × expert(x), visiting each expert once.

    x (N, D); ids, weights (N, K); expert_weights(e) -> (gate_up, down) for expert e.
    """
    out = torch.zeros_like(x)
    flat = ids.flatten()
    for e in flat.unique().tolist():
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        y = expert_forward(x[token], *expert_weights(e), act)
        out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
    return out


class ResidentExperts:
    """Every expert of every MoE layer in memory on the compute device."""

    def __init__(self, layout: ExpertLayout, act):
        self.layout, self.act = layout, act
        self.blobs: dict[int, torch.Tensor] = {}  # layer -> (E, 3·I·D)

    def add_layer(self, layer: int, blob: torch.Tensor):
        self.blobs[layer] = blob

    def __call__(self, layer: int, x, ids, weights):
        blob = self.blobs[layer]

        def expert_weights(e):
            return self.layout.gate_up(blob[e]), self.layout.down(blob[e])

        return moe_combine(x, ids, weights, expert_weights, self.act)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blobs.values())
