"""Qwen3.5/3.6-MoE (qwen3_5_moe, its text part): Qwen3-Next's hybrid layers with the gated
DeltaNet's q|k|v, z, b and a from separate projections, every layer a MoE block, top-k always
renormalized. Published as an image-text model: config.json nests the text model's config in
`text_config` and the weights under `model.language_model.`; the vision tower (`model.visual.`)
is skipped with a notice, as are the multi-token-prediction weights (`mtp.`). Text positions are
the same on M-RoPE's three axes, which makes it plain RoPE."""

from dataclasses import replace

from ..config import ModelConfig
from . import qwen3_next
from .family import Family

DEFAULTS = {"num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512}  # fmt: skip
# beside text_config in an image-text config.json, and meant for the text model too
OUTER = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "dtype", "torch_dtype")


def parse_config(raw: dict) -> ModelConfig:
    text = raw.get("text_config") or raw
    text = {k: raw[k] for k in OUTER if k in raw} | text
    text |= {"norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1}
    cfg = qwen3_next.parse_config({**DEFAULTS, **text})
    return replace(cfg, model_type=raw["model_type"], linear_split_projections=True)


def family(name: str) -> Family:
    return Family(
        name=name,
        parse_config=parse_config,
        renames={"model.language_model.": "model."},
        ignore=lambda key, cfg: key.startswith(("mtp.", "model.visual.")),
        notice=lambda keys: (
            any(k.startswith("model.visual.") for k in keys)
            and "the vision tower is skipped: moelocal runs the text model"
        ),
    )


FAMILY = family("qwen3_5_moe")
TEXT = family("qwen3_5_moe_text")  # the text model saved on its own
