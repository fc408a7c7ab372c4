"""One routed expert as one contiguous blob of bytes, and the math of one expert.

A blob holds the expert's gate and up projections (2I, D), then its down projection (D, I), each
in the layout its matmul takes (quant.py: plain, int8 or int4 segments), then, for families whose
experts have them (gpt-oss), the two biases (2I,) and (D,) in the compute dtype. Moving an expert
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

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, mode: str = "none",
                 bias: bool = False):  # fmt: skip
        self.D, self.I, self.dtype, self.mode, self.bias = hidden, intermediate, dtype, mode, bias
        self.formats = {
            "gate_up": MatrixFormat(mode, 2 * intermediate, hidden, dtype),
            "down": MatrixFormat(mode, hidden, intermediate, dtype),
        }
        self.segments = []  # (matrix, segment, dtype, shape, byte offset)
        layout = [(matrix, fmt.segments) for matrix, fmt in self.formats.items()]
        if bias:
            layout += [(f"{m}_bias", [("b", dtype, (fmt.N,))]) for m, fmt in self.formats.items()]
        offset = 0
        for matrix, segments in layout:
            for name, seg_dtype, shape in segments:
                self.segments.append((matrix, name, seg_dtype, shape, offset))
                offset += seg_dtype.itemsize * torch.Size(shape).numel()
                offset += (-offset) % ALIGN
        self.nbytes = offset

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each matrix (or bias) an expert may be stored as on disk, and its (out, in) shape."""
        I, D = self.I, self.D
        shapes = {"gate": (I, D), "up": (I, D), "down": (D, I), "gate_up": (2 * I, D)}
        if self.bias:
            shapes |= {"gate_up_bias": (2 * I,), "down_bias": (D,)}
        return shapes

    def views(self, blob: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Typed views of a blob's segments: {"gate_up": {"q": ..., ...}, "down": {...}} (and
        {"gate_up_bias": {"b": ...}, "down_bias": {"b": ...}} with biases)."""
        out = {}
        for matrix, name, dtype, shape, offset in self.segments:
            n = dtype.itemsize * torch.Size(shape).numel()
            out.setdefault(matrix, {})[name] = blob[offset : offset + n].view(dtype).view(shape)
        return out

    def fill(self, blob: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
             gate_up_bias=None, down_bias=None) -> torch.Tensor:  # fmt: skip
        """Write an expert's float matrices (and biases) into a blob, quantized as the layout
        says."""
        views = self.views(blob)
        for matrix, w in (("gate_up", gate_up), ("down", down)):
            for name, t in quantize(w, self.formats[matrix]).items():
                views[matrix][name].copy_(t)
        if self.bias:
            views["gate_up_bias"]["b"].copy_(gate_up_bias)
            views["down_bias"]["b"].copy_(down_bias)
        return blob

    def forward(self, x: torch.Tensor, views: dict, glu, weight=None) -> torch.Tensor:
        """One gated expert (glu: models.common.GLU or the like) on the tokens routed to it:
        x (n, D) -> (n, D) in x's dtype, times their routing weights (n, 1) when given."""
        if glu.act is F.silu and not self.bias and kernel_takes(x, self.formats["gate_up"]):
            q = views["gate_up"]["q"], views["down"]["q"]  # decode: one call
            return cpu_kernels.swiglu(x, *q, BITS[self.mode], self.I, weight)
        h = matmul(x, views["gate_up"], self.formats["gate_up"])
        if self.bias:
            h = h + views["gate_up_bias"]["b"]
        y = matmul(glu(*h.chunk(2, dim=-1)), views["down"], self.formats["down"])
        if self.bias:
            y = y + views["down_bias"]["b"]
        return y if weight is None else (y * weight).to(x.dtype)
