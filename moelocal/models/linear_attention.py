"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): a short causal convolution, then a
recurrent state per head (dk x dv) that each token decays, corrects toward its value and reads
with its query. The KV cache holds this state and the convolution's last inputs instead of keys
and values, so a layer costs the same at every position.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import KVCache
from .common import project

CHUNK = 64  # tokens per block of the prefill's chunked form


class GatedDeltaNet(nn.Module):
    """`linear_attn.*` of a Qwen3-Next layer: q, k, v (and the output gate z) from one
    projection with heads grouped as k-heads (`in_proj_qkvz`, `in_proj_ba`), or from one each
    (Qwen3.5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.split = cfg.linear_split_projections
        D, key_dim, value_dim = cfg.hidden_size, self.Hk * self.dk, self.Hv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        if self.split:
            self.in_proj_qkv = nn.Linear(D, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(D, value_dim, bias=False)
            self.in_proj_b = nn.Linear(D, self.Hv, bias=False)
            self.in_proj_a = nn.Linear(D, self.Hv, bias=False)
        else:
            self.in_proj_qkvz = nn.Linear(D, 2 * key_dim + 2 * value_dim, bias=False)
            self.in_proj_ba = nn.Linear(D, 2 * self.Hv, bias=False)
        K = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, D, bias=False)

    def projections(self, x):
        """x (B, T, D) -> the convolution's input q|k|v (B, T, conv_dim), z (B, T, Hv, dv), and
        b, a (B, T, Hv)."""
        B, T, _ = x.shape
        if self.split:
            z = project(self.in_proj_z, x).view(B, T, self.Hv, self.dv)
            qkv, b, a = (project(m, x) for m in (self.in_proj_qkv, self.in_proj_b, self.in_proj_a))
            return qkv, z, b, a
        r = self.Hv // self.Hk  # value heads per key head, grouped per key head on output
        qkvz = project(self.in_proj_qkvz, x).view(B, T, self.Hk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = project(self.in_proj_ba, x).view(B, T, self.Hk, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(B, T, self.Hv, self.dv), b.reshape(B, T, -1), a.reshape(B, T, -1)

    def forward(self, x, kv: KVCache):
        """x (B, T, D) -> (B, T, D). A batch's rows start from their own states (prompts are
        prefilled alone): left padding never reaches them."""
        B, T, _ = x.shape
        qkv, z, b, a = self.projections(x)
        state = kv.recurrent_state(self.layer)
        qkv, conv_state = self.convolve(qkv, state["conv"] if state else None)
        q, k, v = qkv.split([self.Hk * self.dk, self.Hk * self.dk, self.Hv * self.dv], dim=-1)
        q, k = q.view(B, T, self.Hk, self.dk), k.view(B, T, self.Hk, self.dk)
        v = v.view(B, T, self.Hv, self.dv)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # log decay <= 0
        out, recurrent = delta_rule(q, k, v, g, beta, state["recurrent"] if state else None)
        kv.set_recurrent_state(self.layer, conv=conv_state, recurrent=recurrent)
        out = self.norm(out.reshape(-1, self.dv), z.reshape(-1, self.dv))
        return project(self.out_proj, out.view(B, T, -1))

    def convolve(self, qkv: torch.Tensor, prev: torch.Tensor | None):
        """The causal depthwise convolution and its SiLU over the inputs before these (prev:
        (B, C, K - 1), zeros at the start) -> output (B, T, C) and the inputs to keep."""
        w = self.conv1d.weight
        xs = qkv.transpose(1, 2).to(w.dtype)
        if prev is None:
            prev = xs.new_zeros(*xs.shape[:2], w.shape[-1] - 1)
        xs = torch.cat((prev, xs), dim=-1)
        y = F.silu(F.conv1d(xs, w, groups=self.conv_dim))
        return y.transpose(1, 2).to(qkv.dtype), xs[..., xs.shape[-1] - prev.shape[-1] :]


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, times SiLU of its gate z."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, gate):
        dtype = x.dtype
        x = x.float()
        x = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (x * F.silu(gate.float())).to(dtype)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def delta_rule(q, k, v, g, beta, state=None):
    """The gated delta rule, in float32: q, k (B, T, Hk, dk), v (B, T, H, dv), log decays g and
    write strengths beta (B, T, H), state (B, H, dk, dv) or None -> output (B, T, H, dv) in q's
    dtype and the state after the last token. Per token t and head: S <- S exp(g_t);
    S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T q_t, with q, k L2-normalized and q scaled
    by dk^-1/2. One token on a state steps it; more go by blocks (chunked)."""
    dtype, (_, T, Hk, dk), H = q.dtype, k.shape, v.shape[2]
    if H != Hk:  # several value heads share each key head
        q, k = q.repeat_interleave(H // Hk, dim=2), k.repeat_interleave(H // Hk, dim=2)
    q, k, v, beta, g = (t.transpose(1, 2).float().contiguous() for t in (q, k, v, beta, g))
    q, k = l2norm(q), l2norm(k)
    if state is not None and T == 1:
        out, state = step(q[:, :, 0] / dk**0.5, k[:, :, 0], v[:, :, 0], g[:, :, 0],
                          beta[:, :, 0], state.float())  # fmt: skip
        return out[:, None].to(dtype), state
    out, state = chunked(q * dk**-0.5, k, v, g, beta, state)
    return out.transpose(1, 2).to(dtype), state


def step(q, k, v, g, beta, S):
    """One token: q, k (B, H, dk), v (B, H, dv), g, beta (B, H), S (B, H, dk, dv)."""
    S = S * g.exp()[..., None, None]
    delta = (v - (S * k[..., None]).sum(dim=-2)) * beta[..., None]
    S = S + k[..., None] * delta[..., None, :]
    return (S * q[..., None]).sum(dim=-2), S


def chunked(q, k, v, g, beta, S=None):
    """Many tokens (B, H, T, .) by blocks of CHUNK: within a block the corrections are one
    unit-lower-triangular solve, between blocks the state carries over -> (B, H, T, dv), S."""
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % CHUNK
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    n = (T + pad) // CHUNK
    q, k, v = (t.view(B, H, n, CHUNK, -1) for t in (q, k, v))
    kb, vb = k * beta.view(B, H, n, CHUNK, 1), v * beta.view(B, H, n, CHUNK, 1)
    G = g.view(B, H, n, CHUNK).cumsum(dim=-1)  # decay from the block's start, in log space
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool).triu(1)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(later, float("-inf")).exp()
    system = (kb @ k.transpose(-1, -2)) * decay
    values = torch.linalg.solve_triangular(system, vb, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, kb * G.exp()[..., None], upper=False,
                                              unitriangular=True)  # fmt: skip
    inner = (q @ k.transpose(-1, -2)) * decay
    S = values.new_zeros(B, H, dk, dv) if S is None else S.float()
    out = values.new_zeros(values.shape)
    q = q * G.exp()[..., None]
    k = k * (G[..., -1:] - G).exp()[..., None]
    block_decay = G[..., -1].exp()[..., None, None]
    for i in range(n):
        fresh = values[:, :, i] - k_decayed[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + inner[:, :, i] @ fresh
        S = S * block_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ fresh
    return out.view(B, H, -1, dv)[:, :, :T], S
