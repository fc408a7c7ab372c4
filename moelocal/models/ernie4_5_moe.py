"""ERNIE-4.5-MoE (ernie4_5_moe): RoPE on interleaved pairs, optional biases (`use_bias`) on
attention, dense/shared MLPs and the LM head; softmax routing whose top-k is picked with a
correction bias (`moe_statics`) and weighed by the plain probabilities, renormalized over at
least `moe_norm_min`; shared experts; MoE layers from `moe_layer_start_index` to
`moe_layer_end_index` every `moe_layer_interval`."""

from ..config import ModelConfig, common_fields, num_experts
from .family import Family

DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "use_bias": False,
            "moe_intermediate_size": 1536, "moe_k": 6, "moe_num_shared_experts": 2,
            "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
            "moe_norm_min": 1e-12, "tie_word_embeddings": True}  # fmt: skip


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw, default_theta=500000.0)
    n, bias = f["num_hidden_layers"], bool(raw["use_bias"])
    start, end = int(raw["moe_layer_start_index"]), int(raw["moe_layer_end_index"])
    end = n - 1 if end == -1 else end
    interval = int(raw["moe_layer_interval"] or 1)
    n_shared = int(raw["moe_num_shared_experts"] or 0)
    return ModelConfig(
        **f | {"lm_head_bias": bias},
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        rope_interleave=True,
        num_experts=num_experts(raw, 64),
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or raw["moe_k"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        moe_layers=[(i + 1) % interval == 0 and start <= i <= end for i in range(n)],
        norm_topk_prob=True,
        norm_topk_min=float(raw["moe_norm_min"]),
        router_fp32=True,
        router_bias=True,
        shared_expert_intermediate_size=int(raw["moe_intermediate_size"]) * n_shared,
    )


FAMILY = Family(
    name="ernie4_5_moe",
    parse_config=parse_config,
    renames={".mlp.moe_statics.": ".mlp.gate.", ".mlp.shared_experts.": ".mlp.shared_expert."},
)
