"""OLMoE: RMSNorm over the whole query and key projections, optional q/k/v clipping."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw)
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        **f,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=raw.get("clip_qkv"),
        num_experts=num_experts(raw, 64),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 8)),
        moe_intermediate_size=f["intermediate_size"],
        moe_layers=[True] * f["num_hidden_layers"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
    )


FAMILY = Family(name="olmoe", parse_config=parse_config)
