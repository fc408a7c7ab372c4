"""What a family file declares: how to read its config.json, its key table, its attention."""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ModelConfig, num_experts
from ..errors import MoelocalError


def standard_attention() -> type:
    from .attention import Attention  # torch: imported when a model is built, not to read a config

    return Attention


def rotary_dim(cfg: ModelConfig) -> int:
    """Rotated dims of a head: all of them, or partial_rotary_factor's share."""
    return int(cfg.head_dim * cfg.partial_rotary_factor)


@dataclass
class Family:
    name: str
    parse_config: Callable[[dict], ModelConfig]
    # checkpoint key fragment -> module path fragment, for names that differ from ours
    renames: dict[str, str] = field(default_factory=dict)
    # per-expert matrix names on disk -> gate / up / down
    expert_names: dict[str, str] = field(
        default_factory=lambda: {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    )
    # experts stacked on disk (gate_up_proj (E, ...)): stored (E, in, out), for x @ W, and with
    # gate and up rows alternating (gpt-oss), rather than (E, out, in) with gate rows first
    experts_transposed: bool = False
    gate_up_interleaved: bool = False
    attention: Callable[[], type] = standard_attention  # the attention class, on first use
    # the dims of a head that RoPE rotates, the first ones
    rope_dim: Callable[[ModelConfig], int] = lambda cfg: rotary_dim(cfg)
    # checkpoint keys that are known and unused (e.g. DeepSeek-V3's multi-token-prediction layer)
    ignore: Callable[[str, ModelConfig], bool] = lambda key, cfg: False
    # the checkpoint's keys -> a line to tell the user at load (what is skipped), or a falsy value
    notice: Callable[[list[str]], str | None] = lambda keys: None

    def read_config(self, raw: dict) -> ModelConfig:
        """config.json as a ModelConfig; a value of a wrong type is one line, not a traceback."""
        try:
            return self.parse_config(raw)
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:
            raise MoelocalError(f"config.json: a value of the wrong type or shape ({e})") from None

    def build(self, cfg: ModelConfig, experts=None, prefetcher=None):
        """The model (a Transformer), its MoE blocks served by `experts` (see Transformer)."""
        from .transformer import Transformer

        return Transformer(cfg, self.attention(), self.rope_dim(cfg), experts, prefetcher)


def sparse_layers(raw: dict, n_layers: int, default_experts: int) -> list[bool]:
    """Qwen's rule: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    dense = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    n_experts = num_experts(raw, default_experts)
    return [i not in dense and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
