"""Quantized weight formats and their matmuls.

A matrix (N, K) in a format is a few named segments (packed weights, scales); `MatrixFormat`
says their dtypes and shapes, `quantize` fills them, `matmul` multiplies with them:
  int8  per-output-channel symmetric scales, torch's _weight_int8pack_mm (CPU); on CUDA
        dequantized and multiplied in bf16 (weight-only, as on the CPU)
  int4  groups of 32 with a least-squares scale and zero, torch's _weight_int4pack_mm_for_cpu (CPU)
  nf4   bitsandbytes NF4 in blocks of 64 (fp4 likewise, for checkpoints that use it), the
        bytes transformers' load_in_4bit writes; bitsandbytes' matmul_4bit (on CUDA its
        batch-1 kernel for decode; on the CPU it dequantizes and multiplies, slowly)
They take bfloat16 activations: a quantized matmul runs in bfloat16 whatever the model dtype.
The kernels want K a multiple of 32 (int8 silently computes garbage when K % 16 != 0) and, for
int4, N a multiple of 16: odd shapes (tiny test models) are zero-padded, the padding sliced off.

torch's int8/int4 kernels are matrix-vector loops: their time grows with every row of x, which
suits decode (one row) and not a prefill (an expert gets hundreds). From DENSE_ROWS rows on, the
weights are dequantized a slice at a time and multiplied by the bf16 GEMM (AMX where there is
one); for int4 only where N is a multiple of 64, the block torch packs rows in.
"""

import copy
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoelocalError

MODES = ("none", "int8", "int4", "nf4", "fp4")
INT4_GROUP = 32
INT4_FIT_STEPS = 2  # least-squares refinements of each group's scale and zero (see fit_int4)
INT4_BLOCK = 64  # rows packed together by torch's int4 CPU layout (see dequantize_int4)
# rows of x from which dequantize + GEMM beats the kernels (measured crossovers on 7168x1024 and
# 1024x3584 matrices: ~32 rows for int8, ~96 for int4)
DENSE_ROWS = {"int8": 48, "int4": 96}
DENSE_SLICE = 1 << 20  # bytes of dequantized bf16 weight made at a time: they stay in L2
BNB_BLOCK = 64  # bitsandbytes' 4-bit block, as transformers writes it
ACT_DTYPE = torch.bfloat16  # the activations the CPU kernels take


def check_mode(mode: str | None, device: torch.device) -> str | None:
    """A valid --quant for this device; None (not given) stays None."""
    if mode is None:
        return None
    if mode not in MODES:
        raise MoelocalError(f"--quant '{mode}': choose one of {', '.join(MODES)}")
    if mode == "int4" and device.type != "cpu":
        raise MoelocalError("--quant int4 runs on the CPU (--device cpu); on CUDA use nf4 or int8")
    return mode


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class MatrixFormat:
    """How one (N, K) matrix is stored in `mode`: named segments of given dtype and shape."""

    mode: str
    N: int
    K: int
    dtype: torch.dtype  # of an unquantized matrix

    @functools.cached_property  # read by every decode matmul
    def Kp(self) -> int:
        """K padded as the int8/int4 kernels want it (x is padded alike)."""
        if self.mode == "int8":
            return round_up(self.K, 32)
        return round_up(self.K, INT4_GROUP) if self.mode == "int4" else self.K

    @property
    def segments(self) -> list[tuple[str, torch.dtype, tuple]]:
        N, K = self.N, self.K
        if self.mode == "int8":
            return [("q", torch.int8, (N, self.Kp)), ("scale", ACT_DTYPE, (N,))]
        if self.mode == "int4":
            Np, Kp = round_up(N, 16), self.Kp
            return [("q", torch.uint8, (Np, Kp // 2)),
                    ("scale_zero", ACT_DTYPE, (Kp // INT4_GROUP, Np, 2))]  # fmt: skip
        if self.mode in ("nf4", "fp4"):  # bitsandbytes' layout: blocks of the flattened matrix
            n = N * K
            return [("q", torch.uint8, ((n + 1) // 2, 1)),
                    ("absmax", torch.float32, (-(-n // BNB_BLOCK),))]  # fmt: skip
        return [("w", self.dtype, (N, K))]

    @property
    def nbytes(self) -> int:
        return sum(d.itemsize * torch.Size(s).numel() for _, d, s in self.segments)


def quantize(w: torch.Tensor, fmt: MatrixFormat) -> dict[str, torch.Tensor]:
    """(N, K) float weights -> the segments of `fmt`."""
    if fmt.mode == "none":
        return {"w": w.to(fmt.dtype)}
    if fmt.mode in ("nf4", "fp4"):  # as transformers' load_in_4bit quantizes: the same bytes
        quantize_4bit = bitsandbytes().quantize_4bit
        q, state = quantize_4bit(w.to(ACT_DTYPE).contiguous(), blocksize=BNB_BLOCK,
                                 quant_type=fmt.mode)  # fmt: skip
        return {"q": q, "absmax": state.absmax}
    if fmt.mode == "int8":
        w = w.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        return {"q": F.pad(q, (0, fmt.Kp - fmt.K)), "scale": scale.to(ACT_DTYPE)}
    Np, Kp = round_up(fmt.N, 16), fmt.Kp
    groups = Kp // INT4_GROUP
    if (Np, Kp) != (fmt.N, fmt.K):
        w = F.pad(w, (0, Kp - fmt.K, 0, Np - fmt.N))
    packed = torch.empty(Np, Kp // 2, dtype=torch.uint8)
    scale, lo = torch.empty(Np, groups), torch.empty(Np, groups)
    # two blocks of rows at a time (torch packs blocks of 64 rows on their own): the
    # temporaries stay in the CPU's caches, 2-3x faster than the whole matrix at once
    for first in range(0, Np, 2 * INT4_BLOCK):
        rows = slice(first, first + 2 * INT4_BLOCK)
        q, scale[rows], lo[rows] = fit_int4(w[rows].float().reshape(-1, groups, INT4_GROUP))
        q = q.view(-1, Kp).to(torch.int32)
        packed[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    # the kernel computes (q - 8) * scale + zero
    zero = lo + 8 * scale
    scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(ACT_DTYPE).contiguous()
    return {"q": packed, "scale_zero": scale_zero}


def fit_int4(w: torch.Tensor, steps: int = INT4_FIT_STEPS):
    """Groups w (..., g) -> codes q in 0..15, scale and lo (...) with w ~ lo + scale * q.

    Starts from each group's range, then alternates the least-squares scale and lo for the codes
    with the codes rounded for that scale and lo: neither step can raise the squared error.
    """
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((w - lo) / scale).round_().clamp_(0, 15)
    n, sw = w.shape[-1], w.sum(dim=-1, keepdim=True)
    for _ in range(steps):
        # the least-squares line w = lo + scale * q through each group's points (q, w)
        sq, sqq = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)
        sqw = (q * w).sum(-1, keepdim=True)
        det = n * sqq - sq * sq
        fits = det > 0  # not when every code of the group is the same: that group stays
        scale = torch.where(fits, ((n * sqw - sq * sw) / det).clamp(min=1e-12), scale)
        lo = torch.where(fits, (sw - scale * sq) / n, lo)
        q = ((w - lo) / scale).round_().clamp_(0, 15)
    return q, scale[..., 0], lo[..., 0]


def matmul(x: torch.Tensor, seg: dict[str, torch.Tensor], fmt: MatrixFormat) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N), in x's dtype."""
    if fmt.mode == "none":
        return F.linear(x, seg["w"])
    if fmt.mode in ("nf4", "fp4"):
        import bitsandbytes as bnb

        xa, state = x.to(ACT_DTYPE), bnb_state(seg["absmax"], fmt)
        if fmt.K % BNB_BLOCK:  # rows that are not whole blocks: see dequantize_4bit
            return F.linear(xa, dequantize_4bit(seg["q"], state)).to(x.dtype)
        return bnb.matmul_4bit(xa, seg["q"].t(), quant_state=state).to(x.dtype)
    if x.is_cuda or (x.shape[0] >= DENSE_ROWS[fmt.mode] and dense_ok(fmt)):
        return dense_matmul(x, seg, fmt)
    # decode calls this ~10 times per layer and token: no op that is not needed
    xa = x if x.dtype == ACT_DTYPE else x.to(ACT_DTYPE)
    if fmt.Kp != fmt.K:
        xa = F.pad(xa, (0, fmt.Kp - fmt.K))
    if fmt.mode == "int8":
        y = torch._weight_int8pack_mm(xa, seg["q"], seg["scale"])
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xa, seg["q"], INT4_GROUP, seg["scale_zero"])
        if y.shape[1] != fmt.N:
            y = y[:, : fmt.N]
    return y if y.dtype == x.dtype else y.to(x.dtype)


def dense_ok(fmt: MatrixFormat) -> bool:
    """Whether dense_matmul can dequantize this matrix."""
    return fmt.mode == "int8" or (fmt.N % INT4_BLOCK == 0 and int4_unpacks())


def dense_matmul(x: torch.Tensor, seg: dict[str, torch.Tensor], fmt: MatrixFormat):
    """x @ W.T for many rows of x: W dequantized to bf16 one slice of output rows at a time."""
    xa = x.to(ACT_DTYPE)
    step = max(INT4_BLOCK, DENSE_SLICE // (2 * fmt.K) // INT4_BLOCK * INT4_BLOCK)
    if x.is_cuda:  # the whole matrix at once: a GPU has the memory, and launches cost
        step = fmt.N
    if fmt.mode == "int4":
        xa = F.pad(xa, (0, fmt.Kp - fmt.K))
    parts = []
    for n in range(0, fmt.N, step):
        if fmt.mode == "int8":  # |q| <= 127 is exact in bf16: one rounding, of the product
            rows = slice(n, n + step)
            parts.append(
                F.linear(xa, seg["q"][rows, : fmt.K].to(ACT_DTYPE) * seg["scale"][rows, None])
            )
        else:  # W.T in blocks of 64 columns: (blocks, Kp, 64)
            wt = dequantize_int4(seg, n // INT4_BLOCK, min(n + step, fmt.N) // INT4_BLOCK)
            parts.append(torch.matmul(xa, wt).permute(1, 0, 2).flatten(1))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def dequantize_int4(seg: dict[str, torch.Tensor], first: int, last: int) -> torch.Tensor:
    """Blocks first:last of 64 rows of an int4 matrix, transposed: (blocks, Kp, 64) in bf16.
    torch's CPU layout is [N / 64][K][32] bytes, byte i of a block's column k holding rows i
    (low nibble) and 32 + i (high): unpacked, each block is its rows' W.T."""
    groups, Np = seg["scale_zero"].shape[:2]
    Kp = groups * INT4_GROUP
    blocks = seg["q"].view(Np // INT4_BLOCK, Kp, INT4_BLOCK // 2)[first:last]
    q = torch.cat((blocks & 0xF, blocks >> 4), dim=-1).to(ACT_DTYPE)
    sz = seg["scale_zero"][:, first * INT4_BLOCK : last * INT4_BLOCK]
    sz = sz.unflatten(1, (last - first, INT4_BLOCK)).permute(1, 0, 3, 2)  # (blocks, groups, 2, 64)
    scale, zero = sz[:, :, :1].contiguous(), sz[:, :, 1:].contiguous()
    # (q - 8) * scale + zero, as the kernel computes it
    w = q.view(last - first, groups, INT4_GROUP, INT4_BLOCK) * scale + (zero - 8 * scale)
    return w.view(last - first, Kp, INT4_BLOCK)


@functools.cache
def int4_unpacks() -> bool:
    """Whether this torch packs int4 as dequantize_int4 reads it: checked once, on a small
    matrix; if not, every int4 product stays on the kernel."""
    K = 2 * INT4_GROUP
    q = torch.randint(0, 16, (2 * INT4_BLOCK, K), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
    scale_zero = torch.tensor([1.0, 8.0], dtype=ACT_DTYPE).expand(2, 2 * INT4_BLOCK, 2)
    seg = {"q": packed, "scale_zero": scale_zero}  # (q - 8) * 1 + 8 = q
    unpacked = dequantize_int4(seg, 0, 2).transpose(1, 2).reshape(2 * INT4_BLOCK, K)
    return torch.equal(unpacked, q.to(ACT_DTYPE))


@functools.cache
def bitsandbytes():
    """bitsandbytes.functional, imported on first use (a heavy import), without its warning that
    an optional CPU kernel could not be fetched from a hub (it dequantizes and multiplies)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional

    return bitsandbytes.functional


def bnb_state(absmax: torch.Tensor, fmt: MatrixFormat):
    """The bitsandbytes QuantState of an nf4/fp4 matrix stored as quantize() wrote it."""
    bnb = bitsandbytes()
    return bnb.QuantState(absmax=absmax, shape=torch.Size((fmt.N, fmt.K)), blocksize=BNB_BLOCK,
                          code=code_4bit(fmt.mode, absmax.device), quant_type=fmt.mode,
                          dtype=ACT_DTYPE)  # fmt: skip


@functools.cache
def code_4bit(mode: str, device: torch.device) -> torch.Tensor:
    return bitsandbytes().get_4bit_type(mode, device=device)


def dequantize_checkpoint(weight: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """A weight as bitsandbytes wrote it (transformers' load_in_4bit / load_in_8bit), with its
    quant-state tensors by key suffix (absmax, quant_map, nested_*, quant_state.*, SCB) -> float."""
    if "SCB" in aux:  # LLM.int8: int8 rows and their absmax
        return weight.float() * (aux["SCB"].float()[:, None] / 127)
    bnb = bitsandbytes()
    return dequantize_4bit(weight, bnb.QuantState.from_dict(aux, device=weight.device)).float()


def dequantize_4bit(q: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit, told the matrix is one flat row: its CPU kernel (0.50)
    otherwise takes each row to start a block, wrong where rows are not whole blocks."""
    flat = copy.copy(state)
    flat.shape = torch.Size((state.shape.numel(),))
    return bitsandbytes().dequantize_4bit(q, flat).reshape(state.shape)


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored quantized; the bias stays as it was."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        N, K = linear.weight.shape
        self.fmt = MatrixFormat(mode, N, K, linear.weight.dtype)
        for name, t in quantize(linear.weight.detach(), self.fmt).items():
            self.register_buffer(name, t)
        self.bias = linear.bias

    def forward(self, x):
        segs = self._buffers  # exactly the format's segments, by name
        y = matmul(x.reshape(-1, self.fmt.K), segs, self.fmt).view(*x.shape[:-1], self.fmt.N)
        return y + self.bias if self.bias is not None else y


def quantize_linears(model: nn.Module, mode: str, skip=lambda name: False):
    """Swap every nn.Linear (but the skipped ones) for a QuantLinear, in place."""
    if mode == "none":
        return
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not skip(full):
                setattr(module, child_name, QuantLinear(child, mode))
