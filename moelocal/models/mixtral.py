"""Mixtral: softmax top-k routing renormalized over the chosen experts; optional sliding window."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32}


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw, default_theta=1e6)
    window = raw.get("sliding_window")
    return ModelConfig(
        **f | {"sliding_windows": [window] * f["num_hidden_layers"]},
        num_experts=num_experts(raw, 8),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)),
        moe_intermediate_size=f["intermediate_size"],
        moe_layers=[True] * f["num_hidden_layers"],
        norm_topk_prob=True,
    )


FAMILY = Family(
    name="mixtral",
    parse_config=parse_config,
    renames={".block_sparse_moe.": ".mlp."},
    expert_names={"w1": "gate", "w3": "up", "w2": "down"},
)
