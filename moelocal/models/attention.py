"""Attention with a KV cache: the KV cache, the masks, and multi-head attention with grouped KV
heads, optional attention sinks (gpt-oss) and sliding windows (per layer)."""

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_kernels
from ..config import ModelConfig
from .common import apply_rope, cat_rows, norm, on_meta, project


class KVCache:
    """Per layer, two preallocated tensors (B, heads, max_len, d) filled left to right.

    Standard attention stores keys and values; DeepSeek's latent attention stores the compressed
    latent and the shared rotary key; linear attention (linear_attention.py) a recurrent state
    and its convolution's last inputs. `length` advances once per forward pass, after every layer.
    A batch's cache (stack: prompts prefilled one by one) is left-padded: `pads[b]` leading
    positions of row b are padding, which decode steps never attend to (by_row), and row b's
    positions count from its first real token.
    """

    def __init__(self, n_layers: int, max_len: int, pads: list[int] | None = None):
        self.max_len = max_len
        self.length = 0
        self.pads = torch.tensor(pads) if pads and any(pads) else None
        self.tensors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.recurrent: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its state tensors

    def recurrent_state(self, layer: int) -> dict[str, torch.Tensor] | None:
        return self.recurrent.get(layer)

    def set_recurrent_state(self, layer: int, **state: torch.Tensor):
        self.recurrent[layer] = state

    def rewind(self, n: int) -> int:
        """Keep the first n of the tokens held; the number kept. Keys and values are cut at n,
        but a recurrent state holds no positions: it keeps all it holds or starts over (0)."""
        if self.recurrent and n != self.length:
            self.recurrent.clear()
            n = 0
        self.length = n
        return n

    @classmethod
    def stack(cls, caches: list["KVCache"], max_len: int) -> "KVCache":
        """The left-padded batch cache of sequences cached one by one (each prompt prefilled
        alone): row b holds caches[b]'s tokens at its end, after longest - its length pads."""
        longest = max(c.length for c in caches)
        batch = cls(len(caches[0].tensors), max_len, [longest - c.length for c in caches])
        for layer, held in enumerate(caches[0].tensors):
            if held is not None:
                batch.tensors[layer] = tuple(t.new_zeros(len(caches), t.shape[1], max_len,
                                                         t.shape[3]) for t in held)  # fmt: skip
                for b, c in enumerate(caches):
                    for dst, src in zip(batch.tensors[layer], c.tensors[layer], strict=True):
                        dst[b, :, longest - c.length : longest] = src[0, :, : c.length]
            if layer in caches[0].recurrent:
                names = caches[0].recurrent[layer]
                batch.recurrent[layer] = {
                    name: torch.cat([c.recurrent[layer][name] for c in caches]) for name in names
                }
        batch.length = longest
        return batch

    def row(self, b: int) -> "RowCache":
        return RowCache(self, b)

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


class RowCache:
    """Row b of a batch cache (KVCache.stack) as a lone sequence's cache: only its own tokens,
    after its padding, at its own length. A batch's decode step attends row by row through it,
    so that each row's sums are those it would have alone (kernels pick their blocking by the
    number of rows, and SIMD lanes shift with the padding)."""

    pads = None

    def __init__(self, batch: KVCache, b: int):
        self.batch, self.b = batch, b
        self.pad = 0 if batch.pads is None else int(batch.pads[b])
        self.length = batch.length - self.pad

    def update(self, layer: int, a: torch.Tensor, c: torch.Tensor):
        start, end = self.batch.length, self.batch.length + a.shape[2]
        ca, cc = self.batch.tensors[layer]
        assert end <= ca.shape[2], (end, ca.shape[2])  # stack() made them max_len long
        ca[self.b, :, start:end], cc[self.b, :, start:end] = a[0], c[0]
        rows = slice(self.b, self.b + 1)
        return ca[rows, :, self.pad : end], cc[rows, :, self.pad : end]

    def recurrent_state(self, layer: int) -> dict[str, torch.Tensor] | None:
        state = self.batch.recurrent.get(layer)
        return None if state is None else {k: t[self.b : self.b + 1] for k, t in state.items()}

    def set_recurrent_state(self, layer: int, **state: torch.Tensor):
        for name, t in state.items():
            self.batch.recurrent[layer][name][self.b : self.b + 1] = t


def attention_mask(start: int, T: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, start+T): causal, and within the sliding window when there is one."""
    S = start + T
    if T == 1 and (window is None or S <= window):
        return None
    q = torch.arange(start, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= q - k < window
    return mask


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (Mixtral, Qwen2/3-MoE, OLMoE)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.H, self.KV, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, hd = cfg.hidden_size, cfg.head_dim
        self.output_gate = cfg.attention_output_gate  # then q_proj makes each head's gate too
        self.q_proj = nn.Linear(D, self.H * hd * (2 if self.output_gate else 1), bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.KV * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.KV * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * hd, D, bias=cfg.o_bias)
        self.qk_norm, self.clip_qkv, self.scale = cfg.qk_norm, cfg.clip_qkv, cfg.attention_scale
        self.interleaved = cfg.rope_interleave  # ERNIE rotates pairs (x0, x1), (x2, x3), ...
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = norm(cfg, hd), norm(cfg, hd)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = norm(cfg, self.H * hd), norm(cfg, self.KV * hd)
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(self.H))

    def fuse_qkv(self):
        """Put q, k and v in one projection: one kernel call instead of three. For quantized
        layers only: each output row stays what it was, as every row is quantized on its own."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_sizes = [m.out_features for m in parts]
        with on_meta():
            fused = nn.Linear(parts[0].in_features, sum(self.qkv_sizes))
        fused.weight = nn.Parameter(cat_rows([m.weight for m in parts]), requires_grad=False)
        fused.bias = None
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(cat_rows([m.bias for m in parts]), requires_grad=False)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rope, kv: KVCache, mask):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = project(self.qkv_proj, x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = (project(m, x) for m in (self.q_proj, self.k_proj, self.v_proj))
        if self.output_gate:  # per head: hd query dims, then hd gate dims
            q, gate = q.view(B, T, self.H, 2 * self.hd).chunk(2, dim=-1)
            q, gate = q.reshape(B, T, -1), gate.reshape(B, T, -1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = (t.view(B, T, -1, self.hd) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        q, k = apply_rope(q, *rope, self.interleaved), apply_rope(k, *rope, self.interleaved)
        out = by_row(self.attend, self.layer, self.window, kv, mask, q, k, v)
        out = out.transpose(1, 2).reshape(B, T, -1)
        if self.output_gate:
            out = out * torch.sigmoid(gate)
        return project(self.o_proj, out)

    def attend(self, q, k, v, mask):
        return attend(q, k, v, mask, self.window, self.scale, getattr(self, "sinks", None))


def by_row(attend, layer: int, window, kv: KVCache, mask, q, *new):
    """attend(q, *cached, mask) over the cache once it holds `new` (this step's keys and values,
    or latents), (B, H, T, d) -> (B, H, T, dv). A batch's decode step goes row by row, each over
    only its own tokens with the mask it would have alone: batched, the padding would shift the
    sums' SIMD lanes and the kernels' blocking, and a row's result would depend on the others."""
    B, T = q.shape[0], q.shape[2]
    if B == 1 or T > 1:
        return attend(q, *kv.update(layer, *new), mask)
    outs = []
    for b in range(B):
        row = kv.row(b)
        cached = row.update(layer, *(t[b : b + 1] for t in new))
        own_mask = attention_mask(row.length, 1, window, q.device)
        outs.append(attend(q[b : b + 1], *cached, own_mask))
    return torch.cat(outs)


def attend(q, k, v, mask, window, scale=None, sinks=None) -> torch.Tensor:
    """Causal softmax attention of q (B, H, T, dk), the last T of the S positions of k (B, KV, S,
    dk) and v (B, KV, S, dv), mask as attention_mask makes it for `window` -> (B, H, T, dv).
    On the CPU with the compiled kernels, a query row's sums run in an order of its own
    (cpu_kernels.attention), so a prompt prefilled at once, in two turns (a reused prompt cache)
    or token by token gives the same bits; fused attention blocks its sums by the call's sizes."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not q.is_cuda and cpu_kernels.isa() is not None:
        return cpu_kernels.attention(q, k, v, scale, window, sinks)
    if sinks is not None:
        return attention_with_sinks(q, k, v, mask, sinks, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip


SCORE_BYTES = 64 << 20  # float32 attention scores made at a time in a long prefill


def attention_with_sinks(q, k, v, mask, sinks: torch.Tensor, scale=None) -> torch.Tensor:
    """Softmax attention where each head's softmax also counts a learned logit, its sink, that
    attends to nothing (gpt-oss): q (B, H, T, d), k and v (B, KV, S, d), mask as attention_mask
    makes it -> (B, H, T, d); scale of q·k, d^-1/2 if None. PyTorch's fused attention has no
    such term, so the scores are made here, in float32, for a slice of the queries at a time."""
    B, H, T, d = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV  # query heads per KV head: grouped, so k and v are never repeated
    sink = sinks.float().view(1, KV, G, 1, 1)
    if mask is not None and mask.dim() == 4:  # (B, 1, T, S): per row of the batch
        mask = mask.unsqueeze(2)
    step = max(1, SCORE_BYTES // (4 * B * H * S))
    # both products in float32: CPU bf16 batched GEMMs this small run several times slower
    keys, values, outs = k.float().transpose(-1, -2), v.float(), []
    for t in range(0, T, step):
        qs = q[:, :, t : t + step]
        n = qs.shape[2]
        scores = qs.reshape(B, KV, G * n, d).float() @ keys
        scores = scores.view(B, KV, G, n, S) * (d**-0.5 if scale is None else scale)
        if mask is not None:
            scores = scores.masked_fill(~mask[..., t : t + step, :], float("-inf"))
        scores = torch.cat((scores, sink.expand(B, KV, G, n, 1)), dim=-1)
        probs = scores.softmax(dim=-1)[..., :-1]
        outs.append((probs.reshape(B, KV, G * n, S) @ values).view(B, H, n, d))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).to(v.dtype)
