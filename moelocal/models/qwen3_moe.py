"""Qwen3-MoE: RMSNorm on each query and key head, `norm_topk_prob`, no shared expert."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family, sparse_layers

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw)
    n = f["num_hidden_layers"]
    window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window") else None
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        **f | {"sliding_windows": [window] * n},
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        num_experts=num_experts(raw, 128),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 768)),
        moe_layers=sparse_layers(raw, n, default_experts=128),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
    )


FAMILY = Family(name="qwen3_moe", parse_config=parse_config)
