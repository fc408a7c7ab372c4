"""GLM-4.5/4.6 (glm4_moe): DeepSeek-V3's routing (sigmoid scores, a correction bias that picks
the experts, groups, `routed_scaling_factor`) with standard grouped-query attention: q/k/v bias,
optional RMSNorm per query/key head, RoPE over part of each head; shared experts, dense first
layers, multi-token-prediction layers past num_hidden_layers (skipped)."""

from ..config import ModelConfig, common_fields, num_experts
from .deepseek import is_extra_layer
from .family import Family

DEFAULTS = {
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "partial_rotary_factor": 0.5,
    "moe_intermediate_size": 1408, "num_experts_per_tok": 8, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True,
}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw)
    n_shared = int(raw["n_shared_experts"] or 0)
    return ModelConfig(
        **f,
        qkv_bias=bool(raw.get("attention_bias", False)),
        qk_norm="head" if raw.get("use_qk_norm") else None,
        num_experts=num_experts(raw, 128),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        moe_layers=[i >= raw["first_k_dense_replace"] for i in range(f["num_hidden_layers"])],
        norm_topk_prob=bool(raw["norm_topk_prob"]),
        scoring="sigmoid",
        topk_method="noaux_tc",
        n_group=int(raw["n_group"] or 1),
        topk_group=int(raw["topk_group"] or 1),
        routed_scaling_factor=float(raw["routed_scaling_factor"]),
        router_fp32=True,
        router_bias=True,
        shared_expert_intermediate_size=int(raw["moe_intermediate_size"]) * n_shared,
    )


FAMILY = Family(
    name="glm4_moe",
    parse_config=parse_config,
    renames={".mlp.shared_experts.": ".mlp.shared_expert."},
    ignore=is_extra_layer,
)
