"""ModelConfig: one normalized view of every family's config.json.

Field names follow config.json where the families agree; where they differ (num_local_experts,
num_experts, n_routed_experts) each family's `parse_config` maps its names onto these fields.
This module knows nothing about weights or tokenizers.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MoelocalError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: (
        int  # dense MLP layers (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
    )
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope: dict = field(default_factory=dict)  # rope_type, rope_theta, and the type's parameters
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # attention variants
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head" (Qwen3: per head) or "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    sliding_windows: list = field(default_factory=list)  # per layer: window in tokens, or None
    # routed experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: list = field(default_factory=list)  # per layer: True where the MLP is a MoE block
    norm_topk_prob: bool = False
    scoring: str = "softmax"  # "softmax" or "sigmoid" (DeepSeek-V3)
    topk_method: str = "greedy"  # "greedy", "group_limited_greedy" (V2), "noaux_tc" (V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_fp32: bool = False  # DeepSeek computes router logits in float32
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    # shared experts
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    mlp_bias: bool = False
    # multi-head latent attention (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.torch_dtype or "float32", torch.float32)


def read_config_json(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MoelocalError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoelocalError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise MoelocalError(f"{path}: expected a JSON object")
    if "text_config" in raw and "model_type" not in raw.get("text_config", {}):
        raise MoelocalError(f"{path}: multimodal configs are not supported")
    return raw


def require(raw: dict, *names: str):
    """The first of `names` present in config.json; a clear error when none is."""
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    raise MoelocalError(f"config.json: missing '{names[0]}'")


def num_experts(raw: dict, default: int) -> int:
    """Families name the routed expert count differently, and transformers' attribute maps make
    any of the names appear in a saved config.json."""
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if raw.get(name) is not None:
            return int(raw[name])
    return default


def rope_parameters(raw: dict, default_theta: float) -> dict:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` and `rope_scaling`."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", raw.get("rope_theta", default_theta))
    if rope["rope_type"] in ("yarn", "llama3", "longrope"):
        rope.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return rope


def eos_ids(raw: dict) -> list[int]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def common_fields(raw: dict, default_theta: float = 10000.0) -> dict:
    """Fields every family reads the same way."""
    hidden = int(require(raw, "hidden_size"))
    heads = int(require(raw, "num_attention_heads"))
    layers = int(require(raw, "num_hidden_layers"))
    return dict(
        model_type=raw["model_type"],
        vocab_size=int(require(raw, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size") or 0),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=raw.get("hidden_act", "silu"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=rope_parameters(raw, default_theta),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_ids(raw),
        sliding_windows=[None] * layers,
    )
