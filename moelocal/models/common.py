"""The layers every family shares: norms, RoPE, activations, dense MLPs.

A family file (mixtral.py, deepseek.py, ...) holds only what differs: its config names, its key
table and, for DeepSeek, latent attention. Module and parameter names follow the Hugging Face
checkpoints (`self_attn.q_proj`, `mlp.gate`), so resident weights load by name. Attention and
its KV cache are in attention.py, routing and the MoE block in moe.py, the decoder stack in
transformer.py.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import cpu_kernels
from ..config import ModelConfig
from ..errors import MoelocalError
from ..quant import ROWWISE_ROWS, each_row, row_invariant_linear

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class SkipInitOnMeta(TorchFunctionMode):
    """Leaves the random or constant fills of meta tensors undone: they hold no numbers, and
    PyTorch's first fill of one imports its Python decompositions (0.8 s of every load here)."""

    FILLS = ("normal_", "uniform_", "zero_", "fill_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        filling = getattr(func, "__module__", None) == "torch.nn.init" or (
            getattr(func, "__name__", None) in self.FILLS
        )
        target = args[0] if args else kwargs.get("tensor")
        if filling and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta():
    """Modules built on the meta device (shapes only, weights assigned later), uninitialized."""
    with torch.device("meta"), SkipInitOnMeta():
        yield


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows; meta tensors (shapes only) without an op, which on the meta device
    imports torch._dynamo the first time (1.1 s)."""
    if not tensors[0].is_meta:
        return torch.cat(tensors)
    rows = sum(t.shape[0] for t in tensors)
    return torch.empty(rows, *tensors[0].shape[1:], dtype=tensors[0].dtype, device="meta")


def activation(name: str):
    if name not in ACTIVATIONS:
        raise MoelocalError(
            f"unsupported hidden_act '{name}' (supported: {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


class GLU:
    """An expert's gated unit: act(gate) * up (SwiGLU with silu)."""

    def __init__(self, act):
        self.act = act

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


class ClampedSwiGLU:
    """gpt-oss's: the gate clamped from above and up on both sides at `limit`, then
    (up + 1) * gate * sigmoid(alpha * gate)."""

    act = None  # not act(gate) * up: never the fused SwiGLU kernel

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = alpha, limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def gated_unit(cfg: ModelConfig):
    """The routed experts' gated unit for this config."""
    if cfg.swiglu_limit is not None:
        return ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit)
    return GLU(activation(cfg.hidden_act))


class RMSNorm(nn.Module):
    """weight_in_float: weighed in float32 and rounded after (gpt-oss, Qwen3-Next); otherwise
    rounded to x's dtype before the weight (Llama and the rest), as transformers does for each.
    offset: added to the weight (Qwen3-Next stores weight - 1; with weight_in_float)."""

    def __init__(self, dim: int, eps: float, weight_in_float: bool = False, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_in_float, self.offset = eps, weight_in_float, offset

    def forward(self, x):
        # spelled out: F.rms_norm's upcast and rounding changed across the torch releases we admit
        ops = cpu_kernels.extension() if x.device.type == "cpu" else None
        if ops is not None and self.weight.dtype == x.dtype and not self.weight_in_float:
            return ops.rms_norm(x, self.weight, self.eps)  # the same steps in one call
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float:
            return ((self.weight.float() + self.offset) * x).to(dtype)
        return self.weight * x.to(dtype)


def norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """A norm of dim as this family computes its norms: RMSNorm, or LayerNorm (Phi-3.5-MoE)."""
    if cfg.norm_type == "layer":
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps, cfg.norm_weight_in_float, cfg.norm_offset)


# ---- rotary position embeddings -------------------------------------------------------------


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for rope_type default, linear, dynamic or yarn,
    made on the CPU even while a model is built on the meta device (they are numbers, and a meta
    arange costs PyTorch's Python decompositions their first import, 1.1 s)."""
    base, kind = float(rope["rope_theta"]), rope["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    if kind in ("default", "dynamic"):
        # dynamic NTK only changes past max_position_embeddings, which moelocal never exceeds
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    if kind == "longrope":  # the short factors; Rotary switches to the long ones past original
        return longrope_frequencies(dim, rope, long=False)
    if kind == "yarn":
        factor, original = rope["factor"], rope["original_max_position_embeddings"]
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
        beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
        ramp = ((ramp - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attention_factor)
    raise MoelocalError(
        f"unsupported rope_type '{kind}' (supported: default, linear, dynamic, yarn, longrope)"
    )


def longrope_frequencies(dim: int, rope: dict, long: bool) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): the frequencies divided by a factor each, short ones within the
    original context and long ones past it; the cos/sin scale from the context's growth, or
    the config's short_mscale / long_mscale (Phi-3.5-MoE)."""
    original, factor = rope["original_max_position_embeddings"], rope["factor"]
    scale = rope.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    scale = rope.get("long_mscale" if long else "short_mscale") or scale
    ext = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float32,
                       device="cpu")  # fmt: skip
    if ext.shape != (dim // 2,):
        raise MoelocalError(f"config.json: longrope factors must be {dim // 2} numbers")
    base = float(rope["rope_theta"])
    return 1.0 / (ext * base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)), float(scale)


class Rotary(nn.Module):
    def __init__(self, dim: int, rope: dict):
        super().__init__()
        inv_freq, self.scale = rope_frequencies(dim, rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.long_scale = None  # longrope: the scale past `original` positions (and long_inv_freq)
        if rope["rope_type"] == "longrope":
            self.original = rope["original_max_position_embeddings"]
            long_freq, long_scale = longrope_frequencies(dim, rope, long=True)
            self.register_buffer("long_inv_freq", long_freq, persistent=False)
            self.long_scale = long_scale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """Positions (B, T) -> cos and signed sin (B, 1, T, dim) for apply_rope, made once per
        forward pass for every layer. Longrope switches to its long frequencies once a position
        is past the original context, for the whole pass (as transformers does)."""
        inv_freq, scale = self.inv_freq, self.scale
        if self.long_scale is not None and int(positions.max()) + 1 > self.original:
            inv_freq, scale = self.long_inv_freq, self.long_scale
        freqs = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        half = sin.shape[-1] // 2
        sin[..., :half].neg_()  # rotate_half's minus, folded in
        return cos, sin


def apply_rope(x, cos, sin, interleaved: bool = False):
    """x: (B, H, T, d); cos, sin from Rotary, over the first d or fewer dims. Interleaved
    pairs (x0, x1), (x2, x3) are DeepSeek's layout: de-interleaving q and k alike leaves every
    q·k product unchanged."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (GLM): the rest of each head passes as it is
        return torch.cat((apply_rope(x[..., :rotary], cos, sin, interleaved), x[..., rotary:]), -1)
    if interleaved:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    ops = cpu_kernels.extension() if x.device.type == "cpu" else None
    if ops is not None and cos.dtype == x.dtype:  # the same roundings in one call
        return ops.rope(x, cos, sin)
    # x·cos + rotate_half(x)·sin, where rotate_half(x) = (-x2, x1) = roll(x) with signs in sin
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ---- feed-forward ---------------------------------------------------------------------------


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) with each row of x getting what it would get alone (a decode batch's rows as
    lone sequences'): moelocal's int8/int4 kernels do by construction, plain Linear layers go
    through quant.row_invariant_linear, anything else row by row."""
    if isinstance(linear, nn.Linear):
        return row_invariant_linear(x, linear.weight, linear.bias)
    rows = x.numel() // x.shape[-1]
    if not 1 < rows <= ROWWISE_ROWS or getattr(linear, "rows_independent", False):
        return linear(x)
    return each_row(linear, x)


class MLP(nn.Module):
    def __init__(self, D: int, I: int, act: str, bias: bool = False):  # noqa: E741
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=bias)
        self.up_proj = nn.Linear(D, I, bias=bias)
        self.down_proj = nn.Linear(I, D, bias=bias)
        self.act = activation(act)

    def forward(self, x):
        h = self.act(project(self.gate_proj, x)) * project(self.up_proj, x)
        return project(self.down_proj, h)
