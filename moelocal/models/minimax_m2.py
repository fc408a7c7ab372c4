"""MiniMax-M2 (minimax_m2): RMSNorm over the whole q and k projections, RoPE on part of each head
(`rotary_dim`, or `partial_rotary_factor`); sigmoid routing whose top-k is picked with a
correction bias and weighed by the plain scores, renormalized; every layer MoE. Key names as
Mixtral's (`block_sparse_moe`, w1/w3/w2)."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 196608, "head_dim": 128,
            "num_local_experts": 256, "num_experts_per_tok": 8}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    rope = raw.get("rope_parameters") or {}
    if raw.get("rotary_dim") and not (raw.get("partial_rotary_factor")
                                      or rope.get("partial_rotary_factor")):  # fmt: skip
        raw["partial_rotary_factor"] = raw["rotary_dim"] / raw["head_dim"]  # released configs
    f = common_fields(raw, default_theta=5e6)
    return ModelConfig(
        **f,
        qk_norm="full",
        num_experts=num_experts(raw, 256),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=f["intermediate_size"],
        moe_layers=[True] * f["num_hidden_layers"],
        norm_topk_prob=True,
        scoring="sigmoid",
        topk_method="noaux_tc",
        router_fp32=True,
        router_bias=True,
    )


FAMILY = Family(
    name="minimax_m2",
    parse_config=parse_config,
    renames={
        ".block_sparse_moe.": ".mlp.",
        ".mlp.e_score_correction_bias": ".mlp.gate.e_score_correction_bias",
    },  # fmt: skip
    expert_names={"w1": "gate", "w3": "up", "w2": "down"},
)
