"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v bias, a shared expert behind a sigmoid gate,
dense MLP layers by `mlp_only_layers` / `decoder_sparse_step`, optional sliding window."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family, sparse_layers

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "qkv_bias": True}


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw)
    n = f["num_hidden_layers"]
    types = raw.get("layer_types") or [
        "sliding_attention"
        if (i + 1) % 2 and i < raw.get("max_window_layers", 28) and raw.get("use_sliding_window")
        else "full_attention"
        for i in range(n)
    ]
    window = raw.get("sliding_window", 4096)
    windows = [window if t == "sliding_attention" else None for t in types]
    return ModelConfig(
        **f | {"sliding_windows": windows},
        qkv_bias=bool(raw["qkv_bias"]),
        num_experts=num_experts(raw, 60),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 4)),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 1408)),
        moe_layers=sparse_layers(raw, n, default_experts=60),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size", 5632)),
        shared_expert_gate=True,
    )


FAMILY = Family(name="qwen2_moe", parse_config=parse_config)
