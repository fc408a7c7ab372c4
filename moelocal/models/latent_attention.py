"""DeepSeek's multi-head latent attention: caches the compressed KV latent and the shared rotary
key, not full keys and values: (kv_lora_rank + qk_rope_head_dim) numbers per token instead of
2·heads·head_dim."""

import torch
from torch import nn

from ..config import ModelConfig
from .attention import attend, by_row
from .common import RMSNorm, apply_rope, project, yarn_mscale


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.H = layer, cfg.num_attention_heads
        self.nope, self.rope, self.vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank, self.interleaved = cfg.kv_lora_rank, cfg.rope_interleave
        D, qk = cfg.hidden_size, self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, self.H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(
                cfg.q_lora_rank, 1e-6
            )  # transformers ignores rms_norm_eps here
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + self.rope, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.H * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(self.H * self.vd, D, bias=cfg.o_bias)
        self.scale = qk**-0.5
        rope = cfg.rope
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
            self.scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2

    def forward(self, x, rope, kv, mask):
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = project(self.q_proj, x)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, x)))
        q = q.view(B, T, self.H, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = project(self.kv_a_proj_with_mqa, x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.rank)
        k_pe = k_pe.view(B, 1, T, self.rope)
        q_pe, k_pe = (apply_rope(t, *rope, self.interleaved) for t in (q_pe, k_pe))
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = by_row(self.attend, self.layer, None, kv, mask, q, latent, k_pe)
        return project(self.o_proj, out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, latent, k_pe, mask):
        """q (B, H, T, nope + rope) over the cached latents (B, 1, S, rank) and rotary keys."""
        B, S = latent.shape[0], latent.shape[2]
        kv = self.kv_b_proj(latent).view(B, S, self.H, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(B, self.H, S, self.rope)), dim=-1)
        return attend(q, k, v, mask, None, self.scale)
