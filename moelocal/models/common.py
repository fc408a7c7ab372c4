"""The layers every family shares: norms, RoPE, attention with a KV cache, dense MLPs.

A family file (mixtral.py, deepseek.py, ...) holds only what differs: its config names, its key
table and, for DeepSeek, latent attention. Module and parameter names follow the Hugging Face
checkpoints (`self_attn.q_proj`, `mlp.gate`), so resident weights load by name. Routing and the
MoE block are in moe.py, the decoder stack in transformer.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernels
from ..config import ModelConfig
from ..errors import MoelocalError

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise MoelocalError(
            f"unsupported hidden_act '{name}' (supported: {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalized in float32 and rounded to x's dtype before the weight, as transformers does
        # (spelled out: F.rms_norm's upcast and rounding changed across the torch releases we admit)
        ops = cpu_kernels.extension() if x.device.type == "cpu" else None
        if ops is not None and self.weight.dtype == x.dtype:  # the same steps in one call
            return ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---- rotary position embeddings -------------------------------------------------------------


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for rope_type default, linear, dynamic or yarn."""
    base, kind = float(rope["rope_theta"]), rope["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if kind in ("default", "dynamic"):
        # dynamic NTK only changes past max_position_embeddings, which moelocal never exceeds
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
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
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attention_factor)
    raise MoelocalError(
        f"unsupported rope_type '{kind}' (supported: default, linear, dynamic, yarn)"
    )


class Rotary(nn.Module):
    def __init__(self, dim: int, rope: dict):
        super().__init__()
        inv_freq, self.scale = rope_frequencies(dim, rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """Positions (B, T) -> cos and signed sin (B, 1, T, dim) for apply_rope, made once per
        forward pass for every layer."""
        freqs = positions[:, None, :, None].float() * self.inv_freq  # (B, 1, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
        half = sin.shape[-1] // 2
        sin[..., :half].neg_()  # rotate_half's minus, folded in
        return cos, sin


def apply_rope(x, cos, sin, interleaved: bool = False):
    """x: (B, H, T, d); cos, sin from Rotary. Interleaved pairs (x0, x1), (x2, x3) are DeepSeek's
    layout: de-interleaving q and k alike leaves every q·k product unchanged."""
    if interleaved:
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    ops = cpu_kernels.extension() if x.device.type == "cpu" else None
    if ops is not None and cos.dtype == x.dtype:  # the same roundings in one call
        return ops.rope(x, cos, sin)
    # x·cos + rotate_half(x)·sin, where rotate_half(x) = (-x2, x1) = roll(x) with signs in sin
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


# ---- attention ------------------------------------------------------------------------------


class KVCache:
    """Per layer, two preallocated tensors (B, heads, max_len, d) filled left to right.

    Standard attention stores keys and values; DeepSeek's latent attention stores the compressed
    latent and the shared rotary key. `length` advances once per forward pass, after every layer.
    A batch of prompts of different lengths is left-padded: `pads[b]` leading positions of row b
    are padding, never attended to, and row b's positions count from its first real token.
    """

    def __init__(self, n_layers: int, max_len: int, pads: list[int] | None = None):
        self.max_len = max_len
        self.length = 0
        self.pads = torch.tensor(pads) if pads and any(pads) else None
        self.tensors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    def update(self, layer: int, a: torch.Tensor, b: torch.Tensor):
        end = self.length + a.shape[2]
        assert end <= self.max_len, (end, self.max_len)
        held = self.tensors[layer]
        if held is None or held[0].shape[2] < end:
            # room for what is asked; a long-lived cache (a chat) grows by doubling, not to
            # max_len at once, which may be the model's whole context
            size = min(self.max_len, max(end, 2 * held[0].shape[2] if held else end))
            grown = tuple(t.new_zeros(*t.shape[:2], size, t.shape[3]) for t in (a, b))
            if held is not None:
                for new, old in zip(grown, held, strict=True):
                    new[:, :, : self.length] = old[:, :, : self.length]
            self.tensors[layer] = held = grown
        ca, cb = held
        ca[:, :, self.length : end] = a
        cb[:, :, self.length : end] = b
        return ca[:, :, :end], cb[:, :, :end]


def attention_mask(start: int, T: int, window: int | None, pads, device) -> torch.Tensor | None:
    """Boolean (T, start+T), or (B, 1, T, start+T) with left padding: causal, within the sliding
    window when there is one, and never onto padding."""
    S = start + T
    if T == 1 and (window is None or S <= window) and pads is None:
        return None
    q = torch.arange(start, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    if pads is not None:
        real = k[None] >= pads.to(device)[:, None, None]  # (B, 1, S)
        # a padding query attends to itself only: its output is unused, and never NaN
        mask = (mask[None] & real) | (q == k)[None]
        mask = mask[:, None]
    return mask


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (Mixtral, Qwen2/3-MoE, OLMoE)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.H, self.KV, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.KV * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.KV * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * hd, D, bias=cfg.o_bias)
        self.qk_norm, self.clip_qkv = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.H * hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.KV * hd, cfg.rms_norm_eps)

    def fuse_qkv(self):
        """Put q, k and v in one projection: one kernel call instead of three. For quantized
        layers only: each output row stays what it was, as every row is quantized on its own."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_sizes = [m.out_features for m in parts]
        fused = nn.Linear(parts[0].in_features, sum(self.qkv_sizes), device="meta")
        fused.weight = nn.Parameter(torch.cat([m.weight for m in parts]), requires_grad=False)
        fused.bias = None
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in parts]), requires_grad=False)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rope, kv: KVCache, mask):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = (t.view(B, T, -1, self.hd) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = kv.update(self.layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.H != self.KV)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# ---- feed-forward ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, D: int, I: int, act: str, bias: bool = False):  # noqa: E741
        super().__init__()
        self.gate_proj = nn.Linear(D, I, bias=bias)
        self.up_proj = nn.Linear(D, I, bias=bias)
        self.down_proj = nn.Linear(I, D, bias=bias)
        self.act = activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
