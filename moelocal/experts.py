"""One routed expert as one contiguous blob of bytes, and the math of one expert.

A blob holds the expert's gate and up projections (2I, D), then its down projection (D, I), each
in the layout its matmul takes (quant.py: plain, int8 or int4 segments), so moving an expert
between tiers is a single copy and a stack of blobs (n, bytes) is a layer's worth of slots.
This module does not route (models/common.py) nor cache (expert_cache.py).
"""

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .quant import BITS, MatrixFormat, kernel_takes, matmul, quantize

ALIGN = 64  # every segment starts on a cache line, so that its dtype view is aligned


class ExpertLayout:
    """Where each segment of each matrix lies in an expert's blob."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, mode: str = "none"):
        self.D, self.I, self.dtype, self.mode = hidden, intermediate, dtype, mode
        self.formats = {
            "gate_up": MatrixFormat(mode, 2 * intermediate, hidden, dtype),
            "down": MatrixFormat(mode, hidden, intermediate, dtype),
        }
        self.segments = []  # (matrix, segment, dtype, shape, byte offset)
        offset = 0
        for matrix, fmt in self.formats.items():
            for name, seg_dtype, shape in fmt.segments:
                self.segments.append((matrix, name, seg_dtype, shape, offset))
                offset += seg_dtype.itemsize * torch.Size(shape).numel()
                offset += (-offset) % ALIGN
        self.nbytes = offset

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each matrix an expert may be stored as on disk, and its (out, in) shape."""
        I, D = self.I, self.D
        return {"gate": (I, D), "up": (I, D), "down": (D, I), "gate_up": (2 * I, D)}

    def views(self, blob: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Typed views of a blob's segments: {"gate_up": {"q": ..., ...}, "down": {...}}."""
        out = {matrix: {} for matrix in self.formats}
        for matrix, name, dtype, shape, offset in self.segments:
            n = dtype.itemsize * torch.Size(shape).numel()
            out[matrix][name] = blob[offset : offset + n].view(dtype).view(shape)
        return out

    def fill(self, blob: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """Write an expert's float matrices into a blob, quantizing them as the layout says."""
        views = self.views(blob)
        for matrix, w in (("gate_up", gate_up), ("down", down)):
            for name, t in quantize(w, self.formats[matrix]).items():
                views[matrix][name].copy_(t)
        return blob

    def forward(self, x: torch.Tensor, views: dict, act, weight=None) -> torch.Tensor:
        """One SwiGLU expert on the tokens routed to it: x (n, D) -> (n, D) in x's dtype, times
        their routing weights (n, 1) when given."""
        if act is F.silu and kernel_takes(x, self.formats["gate_up"]):  # decode: one call
            q = views["gate_up"]["q"], views["down"]["q"]
            return cpu_kernels.swiglu(x, *q, BITS[self.mode], self.I, weight)
        gate, up = matmul(x, views["gate_up"], self.formats["gate_up"]).chunk(2, dim=-1)
        y = matmul(act(gate) * up, views["down"], self.formats["down"])
        return y if weight is None else (y * weight).to(x.dtype)
