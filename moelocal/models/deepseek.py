"""DeepSeek-V2 and V3: multi-head latent attention (latent_attention.py), dense first layers,
shared experts, group-limited routing (V2: softmax; V3: sigmoid scores with a correction bias,
renormalized and scaled by `routed_scaling_factor`).
"""

import re

from ..config import ModelConfig, common_fields, num_experts
from ..errors import MoelocalError
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


LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def is_extra_layer(key: str, cfg: ModelConfig) -> bool:
    """DeepSeek-V3 checkpoints carry multi-token-prediction layers past num_hidden_layers."""
    m = LAYER_KEY.match(key)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def latent_attention() -> type:
    from .latent_attention import LatentAttention  # torch: imported when a model is built

    return LatentAttention


def deepseek_family(name: str) -> Family:
    return Family(
        name=name,
        parse_config=parse_config,
        renames={".mlp.shared_experts.": ".mlp.shared_expert."},
        attention=latent_attention,
        rope_dim=lambda cfg: cfg.qk_rope_head_dim,
        ignore=is_extra_layer,
    )


V2 = deepseek_family("deepseek_v2")
V3 = deepseek_family("deepseek_v3")
