"""ModelConfig: one normalized view of every family's config.json.

Field names follow config.json where the families agree; where they differ (num_local_experts,
num_experts, n_routed_experts) each family's `parse_config` maps its names onto these fields.
This module knows nothing about weights or tokenizers.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoelocalError
from .model_files import model_file

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def __getattr__(name: str):
    """DTYPES, name -> torch dtype, made on first use: reading a config needs no torch."""
    if name == "DTYPES":
        import torch

        return {n: getattr(torch, n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    rms_norm_eps: float  # of every norm, LayerNorm included
    norm_type: str = "rms"  # "rms", or "layer" (Phi-3.5-MoE: LayerNorm with a bias)
    norm_weight_in_float: bool = False  # gpt-oss: RMSNorm weighs in float32, then rounds
    norm_offset: float = 0.0  # Qwen3-Next: RMSNorm weighs by offset + weight (weights stored - 1)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    rope: dict = field(default_factory=dict)  # rope_type, rope_theta, and the type's parameters
    partial_rotary_factor: float = 1.0  # the share of each head's dims that RoPE rotates (GLM)
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # attention variants
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head" (Qwen3: per head) or "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    attention_sinks: bool = False  # gpt-oss: a learned logit per head in every softmax
    attention_scale: float | None = None  # of q·k; None: head_dim^-1/2 (Granite: its multiplier)
    # Granite's multipliers: of the embeddings, of each block's output into the residual stream,
    # and the logits' divisor
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    attention_output_gate: bool = False  # Qwen3-Next: q_proj also makes a sigmoid gate per output
    # linear attention (Qwen3-Next's gated DeltaNet): per layer, True where it replaces attention
    linear_layers: list = field(default_factory=list)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    linear_split_projections: bool = False  # Qwen3.5: in_proj_qkv, _z, _b, _a, not qkvz and ba
    sliding_windows: list = field(default_factory=list)  # per layer: window in tokens, or None
    # routed experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_layers: list = field(default_factory=list)  # per layer: True where the MLP is a MoE block
    norm_topk_prob: bool = False
    norm_topk_min: float = 0.0  # ERNIE: the sum the top-k weights are divided by is at least this
    # "softmax" (over all experts, then top-k), "topk_softmax" (top-k logits, then softmax over
    # them: gpt-oss), "sigmoid" (DeepSeek-V3) or "sparsemixer" (Phi-3.5-MoE, top-2)
    scoring: str = "softmax"
    router_jitter: float = 0.0  # sparsemixer: logits this close (relatively) to the best compete
    topk_method: str = "greedy"  # "greedy", "group_limited_greedy" (V2), "noaux_tc" (V3)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_fp32: bool = False  # DeepSeek computes router logits in float32
    router_bias: bool = False  # e_score_correction_bias: picks experts (DeepSeek-V3, ERNIE)
    router_linear_bias: bool = False  # gpt-oss: the router is a Linear layer with a bias
    expert_bias: bool = False  # gpt-oss: routed experts' projections have biases
    # gpt-oss's clamped SwiGLU: (clamp(up) + 1) * gate * sigmoid(alpha * gate), gate clamped
    # from above; None: the usual act(gate) * up
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.0
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

    def __post_init__(self):
        """Ranges every family's fields must be in, checked once, where the config is read."""
        if self.torch_dtype not in (None, "auto", *DTYPE_NAMES):
            raise MoelocalError(f"config.json: dtype {self.torch_dtype!r} is not one of "
                                f"{', '.join(DTYPE_NAMES)}")  # fmt: skip
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoelocalError(f"config.json: num_attention_heads ({self.num_attention_heads}) is "
                                f"not a multiple of num_key_value_heads "
                                f"({self.num_key_value_heads})")  # fmt: skip
        bounded("num_experts", self.num_experts, 0, MAX_EXPERTS)
        for window in self.sliding_windows:
            if window is not None:
                bounded("sliding_window", window, 1, 1 << 30)
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise MoelocalError(f"config.json: num_experts_per_tok must be 1..{self.num_experts} "
                                f"(the expert count), got {self.num_experts_per_tok}")  # fmt: skip
        bounded("moe_intermediate_size", self.moe_intermediate_size, 0, MAX_WIDTH)
        bounded("shared_expert_intermediate_size", self.shared_expert_intermediate_size, 0,
                MAX_WIDTH)  # fmt: skip

    @property
    def dtype(self):
        """The checkpoint's torch dtype (float32 when it does not say)."""
        import torch

        return getattr(torch, self.torch_dtype if self.torch_dtype in DTYPE_NAMES else "float32")


# beyond any released model by far, and small enough that planning never allocates much
MAX_LAYERS, MAX_WIDTH, MAX_VOCAB, MAX_HEADS, MAX_EXPERTS = 4096, 1 << 20, 1 << 24, 4096, 1 << 16


def bounded(name: str, value, low: int, high: int) -> int:
    """A whole number of config.json in [low, high], else one line naming the field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MoelocalError(f"config.json: {name} must be a whole number in {low}..{high}, "
                            f"got {value!r}")  # fmt: skip
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise MoelocalError(f"config.json: {name} must be a number in (0, 1), got {value!r}")
    return float(value)


def read_config_json(model_dir: Path) -> dict:
    path = model_file(Path(model_dir), "config.json")
    if path is None:
        raise MoelocalError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
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
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if raw.get(name) is not None:
            return bounded(name, raw[name], 0, MAX_EXPERTS)
    return default


def rope_parameters(raw: dict, default_theta: float) -> dict:
    """transformers 5 writes `rope_parameters`; older configs `rope_theta` and `rope_scaling`."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope["rope_type"] == "su":  # Phi-3's first name for longrope
        rope["rope_type"] = "longrope"
    rope.setdefault("rope_theta", raw.get("rope_theta", default_theta))
    if rope["rope_type"] in ("yarn", "llama3", "longrope"):
        original = raw.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
        rope.setdefault("original_max_position_embeddings", original)
    if rope["rope_type"] == "longrope" and not rope.get("factor"):
        rope["factor"] = raw["max_position_embeddings"] / rope["original_max_position_embeddings"]
    return rope


def rotary_share(raw: dict, rope: dict) -> float:
    """partial_rotary_factor, in rope_parameters (transformers 5) or beside them."""
    share = rope.pop("partial_rotary_factor", None) or raw.get("partial_rotary_factor") or 1.0
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise MoelocalError(f"config.json: partial_rotary_factor must be in (0, 1], got {share!r}")
    return float(share)


def eos_ids(raw: dict) -> list[int]:
    eos = raw.get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise MoelocalError(f"config.json: eos_token_id must be a token id or a list of them, "
                            f"got {eos!r}")  # fmt: skip
    return ids


def common_fields(raw: dict, default_theta: float = 10000.0) -> dict:
    """Fields every family reads the same way."""
    hidden = bounded("hidden_size", require(raw, "hidden_size"), 1, MAX_WIDTH)
    heads = bounded("num_attention_heads", require(raw, "num_attention_heads"), 1, MAX_HEADS)
    layers = bounded("num_hidden_layers", require(raw, "num_hidden_layers"), 1, MAX_LAYERS)
    kv_heads = raw.get("num_key_value_heads") or heads
    rope = rope_parameters(raw, default_theta)
    return dict(
        model_type=raw["model_type"],
        vocab_size=bounded("vocab_size", require(raw, "vocab_size"), 1, MAX_VOCAB),
        hidden_size=hidden,
        intermediate_size=bounded(
            "intermediate_size", raw.get("intermediate_size") or 0, 0, MAX_WIDTH
        ),  # fmt: skip
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=bounded("num_key_value_heads", kv_heads, 1, MAX_HEADS),
        head_dim=bounded("head_dim", raw.get("head_dim") or hidden // heads, 1, MAX_WIDTH),
        max_position_embeddings=bounded(
            "max_position_embeddings", raw.get("max_position_embeddings") or 4096, 1, 1 << 30
        ),
        rms_norm_eps=positive_float("rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
        hidden_act=raw.get("hidden_act", "silu"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=rope,
        partial_rotary_factor=rotary_share(raw, rope),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos_ids(raw),
        sliding_windows=[None] * layers,
        linear_layers=[False] * layers,
    )
