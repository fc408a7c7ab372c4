"""Phi-3.5-MoE (phimoe): LayerNorm with biases in place of RMSNorm, q/k/v/o biases, a bias on
the LM head, optional sliding window, LongRoPE; sparsemixer routing (top-2: the best expert,
then the best of the rest, each weighed by a softmax over the logits near it). Key names as
Mixtral's (`block_sparse_moe`, w1/w3/w2)."""

from ..config import ModelConfig, common_fields, num_experts
from ..errors import MoelocalError
from .family import Family

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "num_local_experts": 16,
            "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "attention_bias": False,
            "lm_head_bias": False}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    if int(raw["num_experts_per_tok"]) != 2:
        raise MoelocalError("config.json: phimoe routes to 2 experts (sparsemixer), "
                            f"num_experts_per_tok is {raw['num_experts_per_tok']}")  # fmt: skip
    f = common_fields(raw, default_theta=1e6)
    if f["rope"]["rope_type"] == "longrope":
        # transformers' phimoe rotates by the short factors at every length and switches only
        # the scale (short_mscale, long_mscale) past the original context: matched here
        f["rope"]["long_factor"] = f["rope"].get("short_factor")
    bias, window = bool(raw["attention_bias"]), raw.get("sliding_window")
    return ModelConfig(
        **f
        | {
            "sliding_windows": [window] * f["num_hidden_layers"],
            "norm_type": "layer",
            "lm_head_bias": bool(raw["lm_head_bias"]),
        },  # fmt: skip
        qkv_bias=bias,
        o_bias=bias,
        num_experts=num_experts(raw, 16),
        num_experts_per_tok=2,
        moe_intermediate_size=f["intermediate_size"],
        moe_layers=[True] * f["num_hidden_layers"],
        scoring="sparsemixer",
        router_jitter=float(raw["router_jitter_noise"]),
    )


FAMILY = Family(
    name="phimoe",
    parse_config=parse_config,
    renames={".block_sparse_moe.": ".mlp."},
    expert_names={"w1": "gate", "w3": "up", "w2": "down"},
)
