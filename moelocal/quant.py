"""Quantized weight formats and their matmuls.

A matrix (N, K) in a format is a few named segments (packed weights, scales); `MatrixFormat`
says their dtypes and shapes, `quantize` fills them, `matmul` multiplies with them:
  int8  Q8_0's numbers: blocks of 32 columns, int8 codes and an fp16 scale (8.5 bits a weight)
  int4  Q4_0's numbers: blocks of 32, codes 0..15 for (code - 8) * scale, an fp16 scale fitted
        by least squares (4.5 bits a weight)
  nf4   bitsandbytes NF4 in blocks of 64 (fp4 likewise, for checkpoints that use it), the
        bytes transformers' load_in_4bit writes; bitsandbytes' matmul_4bit (on CUDA its
        batch-1 kernel for decode; on the CPU it dequantizes and multiplies, slowly)

int8 and int4 are one segment, `q`: a stream of units, one per group of 16 rows and block of 32
columns, each the codes of its 16 rows in k-quads (16 rows x 4 columns, 64 bytes; int4 packs
columns c and c + 16 of a block in one byte), then the 16 rows' scales. N is padded to 16 and K to
32 with zeros. moelocal owns this layout: every instruction set streams the same bytes (the
kernels in csrc/cpu_kernels.cpp quantize x to int8 per block of 32 and use integer dot products),
so a converted model runs on any CPU and a tier move is one copy.

On the CPU the kernels make every product, whatever the row count: a row's result then depends on
nothing but the row, so a prompt prefilled at once, in pieces or token by token gives the same
bits (a reused prompt cache, a batch). On CUDA, or without the compiled kernels, the weights are
dequantized a slice at a time and multiplied by the bf16 GEMM (AMX where there is one): on a
2048-token prefill of mixtral-large int4 the two took the same time here.
"""

import copy
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .errors import MoelocalError

MODES = ("none", "int8", "int4", "nf4", "fp4")
BLOCK = 32  # columns sharing a scale (weights and activations)
GROUP = 16  # rows interleaved in a unit
BITS = {"int8": 8, "int4": 4}
INT4_FIT_STEPS = 2  # least-squares refinements of each block's scale (see fit_int4)
# From 2 to this many rows (a decode batch) an unquantized product is made row by row: BLAS picks
# its kernel by the row count, so a row's sums would otherwise depend on the rows beside it
ROWWISE_ROWS = 16
DENSE_SLICE = 1 << 20  # bytes of dequantized bf16 weight made at a time: they stay in L2
BNB_BLOCK = 64  # bitsandbytes' 4-bit block, as transformers writes it
ACT_DTYPE = torch.bfloat16  # the activations of the dequantize + GEMM path


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

    @property
    def Np(self) -> int:
        return round_up(self.N, GROUP)

    @property
    def Kp(self) -> int:
        return round_up(self.K, BLOCK)

    @property
    def unit_bytes(self) -> int:
        """Bytes of one unit (16 rows x 32 columns) of an int8/int4 stream."""
        return GROUP * BLOCK * BITS[self.mode] // 8 + 2 * GROUP

    @property
    def segments(self) -> list[tuple[str, torch.dtype, tuple]]:
        N, K = self.N, self.K
        if self.mode in BITS:
            units = self.Np // GROUP * self.Kp // BLOCK
            return [("q", torch.uint8, (units * self.unit_bytes,))]
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
    return {"q": quantize_units(w, fmt).view(-1)}


def quantize_units(w: torch.Tensor, fmt: MatrixFormat, fit=None) -> torch.Tensor:
    """(N, K) weights -> int8/int4 units (Np / 16, Kp / 32, unit bytes): each block rounded
    (int8) or fit (int4, fit_int4), then packed. The compiled kernels do both in one pass over
    the weights on every core, reading bf16 as it is: int4 at 640 M parameters/s on AVX-512 and
    350 on AVX2 here (340 and 267 as a fit kernel between torch's conversions and packing); here,
    for a CPU without them or another `fit`, with torch ops."""
    ops = cpu_kernels.extension() if w.device.type == "cpu" and fit is None else None
    if ops is not None:
        return ops.quantize_units(w, BITS[fmt.mode], INT4_FIT_STEPS, cpu_kernels.isa())
    Np, Kp = fmt.Np, fmt.Kp
    if (Np, Kp) != (fmt.N, fmt.K):
        w = F.pad(w, (0, Kp - fmt.K, 0, Np - fmt.N))
    units = torch.empty(
        Np // GROUP, Kp // BLOCK, fmt.unit_bytes, dtype=torch.uint8, device=w.device
    )
    # a few groups of rows at a time: the temporaries stay in the CPU's caches
    step = 16
    for g in range(0, Np // GROUP, step):
        rows = w[g * GROUP : (g + step) * GROUP].float().unflatten(-1, (-1, BLOCK))
        if fmt.mode == "int8":
            codes, scale = quantize_int8(rows)
        else:
            codes, scale = (fit or fit_int4)(rows)
        units[g : g + step] = pack(codes, scale, fmt.mode)
    return units


def quantize_int8(w: torch.Tensor):
    """Blocks w (..., 32) -> int8 codes and fp16 scales, w ~ code * scale (as Q8_0)."""
    scale = (w.abs().amax(-1) / 127).half()
    inv = torch.where(scale > 0, 1 / scale.float(), 0.0)
    return (w * inv[..., None]).round_().clamp_(-127, 127).to(torch.int8), scale


def fit_int4(w: torch.Tensor, steps: int = INT4_FIT_STEPS):
    """Blocks w (..., 32) -> codes 0..15 and fp16 scales, w ~ (code - 8) * scale.

    Q4_0 puts the block's largest magnitude at code 0 (-8 steps); this also tries it at code 15
    (+7 steps), and from each start alternates the least-squares scale for the codes with the
    codes rounded for that scale (neither step can raise the squared error), then keeps the
    better fit of each block: 8% less squared error than Q4_0's rounding on normal weights.
    (The compiled kernels, quantize_units, do the same steps per block; their sums run in
    another order, so a rare code may differ.)
    """
    big = w.gather(-1, w.abs().argmax(-1, keepdim=True))
    best = None
    for steps_of_big in (-8, 7):
        scale = big / steps_of_big
        codes = round_int4(w, scale)
        for _ in range(steps):  # the scale minimizing sum (w - t * scale)^2 for t = code - 8
            t = codes - 8
            tt = (t * t).sum(-1, keepdim=True)
            scale = torch.where(tt > 0, (t * w).sum(-1, keepdim=True) / tt.clamp(min=1), scale)
            codes = round_int4(w, scale)
        scale = scale.half().float()
        codes = round_int4(w, scale)
        error = (w - (codes - 8) * scale).pow_(2).sum(-1, keepdim=True)
        if best is None:
            best = (error, codes, scale)
        else:
            better = error < best[0]
            best = tuple(torch.where(better, new, old)
                         for new, old in zip((error, codes, scale), best, strict=True))  # fmt: skip
    _, codes, scale = best
    return codes.to(torch.uint8), scale[..., 0].half()


def round_int4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The nearest codes 0..15 for the scales (float codes, for the fit's sums)."""
    inv = torch.where(scale != 0, 1 / scale, 0.0)
    return (w * inv).round_().add_(8).clamp_(0, 15)


def pack(codes: torch.Tensor, scale: torch.Tensor, mode: str) -> torch.Tensor:
    """Codes (16g, B, 32) and fp16 scales (16g, B) -> units (g, B, unit bytes)."""
    rows, B = scale.shape
    if mode == "int4":  # columns c and c + 16 share a byte
        codes = codes[..., :16] | (codes[..., 16:] << 4)
    # (g, row, B, quad, 4) -> (g, B, quad, row, 4): each 64 bytes hold 16 rows' quads
    data = codes.view(torch.uint8).view(rows // GROUP, GROUP, B, -1, 4).permute(0, 2, 3, 1, 4)
    scales = scale.view(rows // GROUP, GROUP, B).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat((data.flatten(2), scales), dim=-1)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, Kp) -> float32 x rounded to int8 per block of 32 with a float32 scale: the kernels'
    codes (csrc/cpu_kernels.cpp quantize_rows, the same float operations), times their scale."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, 0.0)
    return ((blocks * inv).round_() * scale).flatten(-2)


def dequantize(q: torch.Tensor, fmt: MatrixFormat, first: int, last: int, dtype) -> torch.Tensor:
    """Groups first:last of 16 rows of an int8/int4 stream -> (16 (last - first), Kp) in dtype."""
    B, g = fmt.Kp // BLOCK, last - first
    units = q.view(-1, B, fmt.unit_bytes)[first:last]
    data_bytes = fmt.unit_bytes - 2 * GROUP
    scale = units[..., data_bytes:].contiguous().view(torch.float16).transpose(1, 2)  # (g, 16, B)
    data = units[..., :data_bytes].unflatten(-1, (-1, GROUP, 4)).permute(0, 3, 1, 2, 4)
    if fmt.mode == "int8":
        codes = data.contiguous().view(torch.int8).float()  # (g, 16, B, 8, 4)
    else:  # low nibbles are columns 0..15 of a block, high ones 16..31
        codes = torch.stack((data & 15, data >> 4), dim=3).float() - 8  # (g, 16, B, 2, 4, 4)
    # in float32, then one rounding per weight: the fp16 scale rounded to bf16 first would be
    # one error shared by a whole block (prefill vs decode KL 0.0036 instead of 0.0016, int4)
    w = codes.reshape(g, GROUP, B, BLOCK) * scale[..., None].float()
    return w.view(g * GROUP, fmt.Kp).to(dtype)


def matmul(x: torch.Tensor, seg: dict[str, torch.Tensor], fmt: MatrixFormat) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N), in x's dtype."""
    if fmt.mode == "none":
        return row_invariant_linear(x, seg["w"])
    if fmt.mode in ("nf4", "fp4"):
        import bitsandbytes as bnb

        xa, state = x.to(ACT_DTYPE), bnb_state(seg["absmax"], fmt)
        if fmt.K % BNB_BLOCK:  # rows that are not whole blocks: see dequantize_4bit
            return F.linear(xa, dequantize_4bit(seg["q"], state)).to(x.dtype)
        return bnb.matmul_4bit(xa, seg["q"].t(), quant_state=state).to(x.dtype)
    if not kernel_takes(x, fmt):
        return dense_matmul(x, seg, fmt)
    return cpu_kernels.gemv(x, seg["q"], BITS[fmt.mode], fmt.N)


def row_invariant_linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear(x, w, bias) where each row of x (..., K) gets what it would get alone: from 2 to
    ROWWISE_ROWS rows (a decode batch), row by row unless this machine's GEMM is found to keep
    rows apart for this shape (gemm_keeps_rows_apart)."""
    rows = x.numel() // x.shape[-1]
    if not 1 < rows <= ROWWISE_ROWS or gemm_keeps_rows_apart(w, rows):
        return F.linear(x, w, bias)
    return each_row(lambda row: F.linear(row, w, bias), x)


def float_linear_any_rows(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear(x, w, bias) in float32, each row of x getting the same bits at any row count (a
    router's logits for a token prefilled with a thousand others and decoded alone): on the CPU
    the compiled fixed-order product, which suits small N; else row_invariant_linear."""
    if x.is_cuda or cpu_kernels.isa() is None:
        return row_invariant_linear(x.float(), w.float(), None if bias is None else bias.float())
    y = cpu_kernels.linear_rows(x.reshape(-1, x.shape[-1]).float(), w.float())
    y = y.view(*x.shape[:-1], -1)
    return y if bias is None else y + bias.float()


def each_row(product, x: torch.Tensor) -> torch.Tensor:
    """product(x) made for each row of x (..., K) alone, then put back together."""
    rows = x.reshape(-1, 1, x.shape[-1])
    return torch.cat([product(row) for row in rows]).view(*x.shape[:-1], -1)


def gemm_keeps_rows_apart(w: torch.Tensor, rows: int) -> bool:
    """Whether F.linear of `rows` rows with weights like w gives each row exactly what it gives
    that row alone. BLAS picks its kernel and blocking by dtype, shape and threads, not by the
    numbers: tried once per such key on random rows with w itself (bf16 GEMMs on AMX do;
    float32 ones on MKL do not)."""
    key = (w.shape, w.dtype, w.device, rows, torch.get_num_threads())
    if key not in ROWS_APART:
        x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(0))
        x = x.to(device=w.device, dtype=w.dtype)
        together = F.linear(x, w)
        ROWS_APART[key] = all(torch.equal(together[i : i + 1], F.linear(x[i : i + 1], w))
                              for i in range(rows))  # fmt: skip
    return ROWS_APART[key]


ROWS_APART: dict[tuple, bool] = {}  # gemm_keeps_rows_apart's findings


def kernel_takes(x: torch.Tensor, fmt: MatrixFormat) -> bool:
    """Whether the compiled CPU kernels multiply x (M, K) with an int8/int4 matrix: on the CPU,
    with the kernels built."""
    return fmt.mode in BITS and not x.is_cuda and cpu_kernels.isa() is not None


def dense_matmul(x: torch.Tensor, seg: dict[str, torch.Tensor], fmt: MatrixFormat):
    """x @ W.T for many rows of x: W dequantized to bf16 one slice of output rows at a time, x
    rounded to int8 as the kernels round it, so that prefill and decode compute alike."""
    xa = round_activations(F.pad(x, (0, fmt.Kp - fmt.K))).to(ACT_DTYPE)
    groups = fmt.Np // GROUP
    step = max(1, DENSE_SLICE // (2 * fmt.Kp * GROUP))
    if x.is_cuda:  # the whole matrix at once: a GPU has the memory, and launches cost
        step = groups
    parts = [F.linear(xa, dequantize(seg["q"], fmt, g, min(g + step, groups), ACT_DTYPE))
             for g in range(0, groups, step)]  # fmt: skip
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    y = y[:, : fmt.N] if fmt.Np != fmt.N else y
    return y if y.dtype == x.dtype else y.to(x.dtype)


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
    """A weight as bitsandbytes wrote it (transformers' load_in_4bit / load_in_8bit) or in FP8
    with block scales, with its quant state by key suffix (absmax, quant_map, nested_*,
    quant_state.*, SCB; weight_scale_inv and its block) -> float."""
    if "SCB" in aux:  # LLM.int8: int8 rows and their absmax
        return weight.float() * (aux["SCB"].float()[:, None] / 127)
    if "weight_scale_inv" in aux:
        return dequantize_fp8(weight, aux["weight_scale_inv"], aux["block"])
    bnb = bitsandbytes()
    return dequantize_4bit(weight, bnb.QuantState.from_dict(aux, device=weight.device)).float()


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]):
    """FP8 (N, K) with one float32 scale per block of (bm, bn) weights, the last block of each
    dimension partial where it does not divide (DeepSeek-V3: 128 x 128, `weight_scale_inv`,
    which multiplies despite its name) -> float32."""
    (N, K), (bm, bn) = weight.shape, block
    if tuple(scale.shape) != (-(-N // bm), -(-K // bn)):
        raise MoelocalError(f"weight_scale_inv of shape {tuple(scale.shape)} does not cover a "
                            f"{N}x{K} weight in blocks of {bm}x{bn}")  # fmt: skip
    scales = scale.float().repeat_interleave(bm, 0)[:N].repeat_interleave(bn, 1)[:, :K]
    return weight.float() * scales


def dequantize_4bit(q: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit, told the matrix is one flat row: its CPU kernel (0.50)
    otherwise takes each row to start a block, wrong where rows are not whole blocks."""
    flat = copy.copy(state)
    flat.shape = torch.Size((state.shape.numel(),))
    return bitsandbytes().dequantize_4bit(q, flat).reshape(state.shape)


# OCP MX FP4 (e2m1): the value of each 4-bit code
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 as gpt-oss's checkpoints store experts -> float32 (N, K): blocks (N, K/32, 16)
    bytes of two e2m1 codes each, the low nibble first; scales (N, K/32) e8m0, i.e. the power of
    two 2^(s - 127) each block of 32 is multiplied by."""
    N, G, _ = blocks.shape
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).view(N, G, -1).long()
    values = torch.tensor(FP4_E2M1)[codes]
    return torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).view(N, -1)


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored quantized; the bias stays as it was.

    QuantLinear(linear, mode) quantizes linear's weight; with empty=True (on the meta device) it
    only takes the format's segments' shapes, for a state dict of quantized weights (a
    converted model's) to be assigned."""

    def __init__(self, linear: nn.Linear, mode: str, dtype: torch.dtype | None = None,
                 empty: bool = False):  # fmt: skip
        super().__init__()
        N, K = linear.weight.shape
        self.fmt = MatrixFormat(mode, N, K, dtype or linear.weight.dtype)
        if empty:
            segments = {name: torch.empty(shape, dtype=dt, device="meta")
                        for name, dt, shape in self.fmt.segments}  # fmt: skip
        else:
            segments = quantize(linear.weight.detach(), self.fmt)
        for name, t in segments.items():
            self.register_buffer(name, t)
        self.bias = linear.bias

    @property
    def rows_independent(self) -> bool:
        """Whether each row's product is the same whatever rows come with it (the CPU kernels'
        int8/int4): see models.common.project."""
        return (
            self.fmt.mode in BITS and cpu_kernels.isa() is not None and self.q.device.type == "cpu"
        )

    def forward(self, x):
        segs = self._buffers  # exactly the format's segments, by name
        y = matmul(x.reshape(-1, self.fmt.K), segs, self.fmt).view(*x.shape[:-1], self.fmt.N)
        return y + self.bias if self.bias is not None else y


def quantize_linears(model: nn.Module, mode: str, skip=lambda name: False, dtype=None,
                     empty: bool = False):  # fmt: skip
    """Swap every nn.Linear (but the skipped ones) for a QuantLinear, in place (empty: shells on
    the meta device in dtype, see QuantLinear)."""
    if mode == "none":
        return
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not skip(full):
                setattr(module, child_name, QuantLinear(child, mode, dtype, empty))
