"""Granite-MoE (granitemoe): Mixtral's layout with IBM's multipliers, on the embeddings, the
attention logits (instead of head_dim^-1/2), each block's output into the residual stream, and
the logits (divided); routing takes the top-k logits and weighs them by their softmax; experts
are stored stacked (`input_linear`: gate then up, `output_linear`)."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family

DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "num_local_experts": 8,
            "num_experts_per_tok": 2}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw)
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        **f,
        qkv_bias=bias,
        o_bias=bias,
        attention_scale=float(raw.get("attention_multiplier", 1.0)),
        embedding_multiplier=float(raw.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
        logits_scaling=float(raw.get("logits_scaling", 1.0)),
        num_experts=num_experts(raw, 8),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=f["intermediate_size"],
        moe_layers=[True] * f["num_hidden_layers"],
        scoring="topk_softmax",
    )


FAMILY = Family(
    name="granitemoe",
    parse_config=parse_config,
    renames={
        ".block_sparse_moe.input_linear.weight": ".mlp.experts.gate_up_proj",
        ".block_sparse_moe.output_linear.weight": ".mlp.experts.down_proj",
        ".block_sparse_moe.router.layer.": ".mlp.gate.",
    },
)
