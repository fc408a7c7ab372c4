"""Qwen3-Next: hybrid layers by `layer_types`, gated DeltaNet linear attention
(linear_attention.py) in most, and in every `full_attention_interval`-th a full attention whose
q_proj also makes a sigmoid gate on its output, with per-head q/k RMSNorm and RoPE on
`partial_rotary_factor` of each head. Norms weigh by 1 + weight. A Qwen2-MoE-style block: softmax
top-k, a shared expert behind a sigmoid gate; dense layers by `mlp_only_layers`. Its
multi-token-prediction weights (`mtp.*`) are skipped."""

from ..config import MAX_HEADS, MAX_WIDTH, ModelConfig, bounded, common_fields, num_experts
from ..errors import MoelocalError
from .family import Family, sparse_layers

DEFAULTS = {
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "head_dim": 256,
    "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
}  # fmt: skip


def linear_fields(raw: dict) -> dict:
    """The gated DeltaNet's dimensions, checked."""
    f = {
        name: bounded(name, raw[name], 1, MAX_WIDTH)
        for name in ("linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim")
    }
    for name in ("linear_num_key_heads", "linear_num_value_heads"):
        f[name] = bounded(name, raw[name], 1, MAX_HEADS)
    if f["linear_num_value_heads"] % f["linear_num_key_heads"]:
        raise MoelocalError("config.json: linear_num_value_heads must be a multiple of "
                            "linear_num_key_heads")  # fmt: skip
    return f


def layer_kinds(raw: dict, n: int) -> list[bool]:
    """Per layer, True where it is linear attention (`layer_types`, or every
    `full_attention_interval`-th layer full)."""
    interval = raw.get("full_attention_interval") or 4
    types = raw.get("layer_types") or [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)
    ]
    if len(types) != n or not set(types) <= {"linear_attention", "full_attention"}:
        raise MoelocalError(f"config.json: layer_types must name {n} layers, each "
                            "linear_attention or full_attention")  # fmt: skip
    return [t == "linear_attention" for t in types]


def parse_config(raw: dict) -> ModelConfig:
    raw = {**DEFAULTS, **raw}
    f = common_fields(raw)
    n = f["num_hidden_layers"]
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        **f
        | {
            "linear_layers": layer_kinds(raw, n),
            "norm_weight_in_float": True,
            "norm_offset": 1.0,
        },  # fmt: skip
        **linear_fields(raw),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        attention_output_gate=True,
        num_experts=num_experts(raw, 512),
        num_experts_per_tok=int(raw["num_experts_per_tok"]),
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        moe_layers=sparse_layers(raw, n, default_experts=512),
        norm_topk_prob=bool(raw["norm_topk_prob"]),
        shared_expert_intermediate_size=int(raw["shared_expert_intermediate_size"]),
        shared_expert_gate=True,
    )


FAMILY = Family(
    name="qwen3_next",
    parse_config=parse_config,
    ignore=lambda key, cfg: key.startswith("mtp."),
)
