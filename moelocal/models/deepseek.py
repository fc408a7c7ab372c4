"""DeepSeek-V2 and V3: multi-head latent attention, dense first layers, shared experts,
group-limited routing (V2: softmax; V3: sigmoid scores with a correction bias, renormalized and
scaled by `routed_scaling_factor`).

Latent attention caches the compressed KV latent and the shared rotary key, not full keys and
values: (kv_lora_rank + qk_rope_head_dim) numbers per token instead of 2·heads·head_dim.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, common_fields, num_experts
from ..errors import MoelocalError
from .common import RMSNorm, apply_rope, yarn_mscale
from .family import Family

V2_DEFAULTS = {
    "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "first_k_dense_replace": 0,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "n_routed_experts": 64, "n_shared_experts": 2,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "routed_scaling_factor": 1.0, "topk_method": "greedy", "moe_intermediate_size": 1407,
    "num_experts_per_tok": 6,
}  # fmt: skip
V3_DEFAULTS = {
    "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "first_k_dense_replace": 3,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "n_routed_experts": 256, "n_shared_experts": 1,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "rope_interleave": True, "moe_intermediate_size": 2048,
}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    v3 = raw["model_type"] == "deepseek_v3"
    raw = {**(V3_DEFAULTS if v3 else V2_DEFAULTS), **raw}
    f = common_fields(raw)
    topk_method = "noaux_tc" if v3 else raw["topk_method"]
    if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise MoelocalError(f"config.json: unsupported topk_method '{topk_method}'")
    n_shared = int(raw["n_shared_experts"] or 0)
    return ModelConfig(
        **f | {"head_dim": raw["qk_rope_head_dim"]},
        qkv_bias=bool(raw.get("attention_bias", False)),
        o_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        num_experts=num_experts(raw, raw["n_routed_experts"]),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        moe_layers=[i >= raw["first_k_dense_replace"] for i in range(f["num_hidden_layers"])],
        norm_topk_prob=v3 and bool(raw["norm_topk_prob"]),  # transformers' V2 router ignores it
        scoring="sigmoid" if v3 else "softmax",
        topk_method=topk_method,
        n_group=int(raw.get("n_group") or 1),
        topk_group=int(raw.get("topk_group") or 1),
        routed_scaling_factor=float(raw["routed_scaling_factor"]),
        router_fp32=True,
        router_bias=v3,
        shared_expert_intermediate_size=int(raw["moe_intermediate_size"]) * n_shared,
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw["v_head_dim"]),
        rope_interleave=bool(raw["rope_interleave"]) if v3 else True,
    )


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
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.H, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.rank)
        k_pe = k_pe.view(B, 1, T, self.rope)
        q_pe, k_pe = (apply_rope(t, *rope, self.interleaved) for t in (q_pe, k_pe))
        latent, k_pe = kv.update(self.layer, latent, k_pe)  # (B, 1, S, rank), (B, 1, S, rope)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent).view(B, S, self.H, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(B, self.H, S, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def is_extra_layer(key: str, cfg: ModelConfig) -> bool:
    """DeepSeek-V3 checkpoints carry multi-token-prediction layers past num_hidden_layers."""
    m = LAYER_KEY.match(key)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def deepseek_family(name: str) -> Family:
    return Family(
        name=name,
        parse_config=parse_config,
        renames={".mlp.shared_experts.": ".mlp.shared_expert."},
        attention_cls=LatentAttention,
        rope_dim=lambda cfg: cfg.qk_rope_head_dim,
        ignore=is_extra_layer,
    )


V2 = deepseek_family("deepseek_v2")
V3 = deepseek_family("deepseek_v3")
