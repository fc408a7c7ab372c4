"""gpt-oss: attention sinks, sliding-window and full layers alternating (`layer_types`), q/k/v/o
biases, YaRN RoPE; a router with a bias whose top-k logits are weighed by their softmax; experts
with biases and a clamped SwiGLU, stored stacked as x @ W with gate and up columns interleaved,
in bf16 or, as published, in MXFP4 (dequantized as read; see loader.checkpoint_quant)."""

from ..config import ModelConfig, common_fields, num_experts
from ..errors import MoelocalError
from .family import Family

DEFAULTS = {
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "head_dim": 64,
    "num_experts_per_tok": 4, "sliding_window": 128, "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0, "attention_bias": True,
}  # fmt: skip
# transformers' default when config.json names no RoPE scaling
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 4096}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    if not raw.get("rope_parameters") and not raw.get("rope_scaling"):
        raw["rope_parameters"] = YARN
    f = common_fields(raw, default_theta=150000.0)
    n = f["num_hidden_layers"]
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]
    if len(types) != n:
        raise MoelocalError(f"config.json: layer_types lists {len(types)} layers, "
                            f"num_hidden_layers is {n}")  # fmt: skip
    window = raw["sliding_window"]
    limit, alpha = float(raw["swiglu_limit"]), float(raw["swiglu_alpha"])
    if not limit > 0:
        raise MoelocalError(f"config.json: swiglu_limit must be > 0, got {raw['swiglu_limit']!r}")
    bias = bool(raw["attention_bias"])
    return ModelConfig(
        **f
        | {
            "sliding_windows": [window if t == "sliding_attention" else None for t in types],
            "norm_weight_in_float": True,
        },  # fmt: skip
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        num_experts=num_experts(raw, 128),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=f["intermediate_size"],
        moe_layers=[True] * n,
        scoring="topk_softmax",
        router_linear_bias=True,
        expert_bias=True,
        swiglu_limit=limit,
        swiglu_alpha=alpha,
    )


FAMILY = Family(
    name="gpt_oss",
    parse_config=parse_config,
    renames={".mlp.router.": ".mlp.gate."},
    experts_transposed=True,
    gate_up_interleaved=True,
)
