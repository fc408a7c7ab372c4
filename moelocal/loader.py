"""Checkpoint -> model: every tensor sorted into resident weights or routed experts by a key table.

The resident model is built on the meta device and its weights are assigned from the lazy reader,
so nothing is allocated twice. Routed experts never become parameters: they are packed into one
blob per expert (experts.py). A checkpoint key that the table does not map is an error naming it.
"""

import re
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import MoelocalError
from .experts import ExpertLayout, ResidentExperts
from .models import FAMILIES
from .models.common import Rotary, Transformer, activation
from .models.family import Family

# per-expert matrices, as transformers saves them
EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
# experts already stacked on disk: gate_up_proj (E, 2I, D) and down_proj (E, D, I)
FUSED_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
UNUSED_KEY = re.compile(r".*rotary_emb\.inv_freq")


@dataclass
class LoadedModel:
    family: Family
    cfg: ModelConfig
    model: Transformer
    experts: ResidentExperts


def family_of(raw_config: dict) -> Family:
    model_type = raw_config.get("model_type")
    if model_type not in FAMILIES:
        raise MoelocalError(
            f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def sort_keys(ckpt: Checkpoint, family: Family, cfg: ModelConfig, expected: set[str]):
    """-> (resident: our name -> checkpoint key, experts: (layer, expert, part) -> key, fused)."""
    resident, experts, fused = {}, {}, {}
    for key in ckpt.keys():
        name = key
        for old, new in family.renames.items():
            name = name.replace(old, new)
        if name in expected:
            resident[name] = key
        elif m := EXPERT_KEY.fullmatch(name):
            part = family.expert_names.get(m.group(3))
            if part is None:
                raise MoelocalError(
                    f"unexpected expert tensor {key} in the {family.name} key table"
                )
            experts[int(m.group(1)), int(m.group(2)), part] = key
        elif m := FUSED_EXPERT_KEY.fullmatch(name):
            fused[int(m.group(1)), m.group(2)] = key
        elif not (UNUSED_KEY.fullmatch(name) or family.ignore(key, cfg)):
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise MoelocalError(f"unexpected tensor {key}: not in the {family.name} key table")
    return resident, experts, fused


def load_model(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None = None
) -> LoadedModel:
    family = family_of(ckpt.config)
    cfg = family.parse_config(ckpt.config)
    dtype = dtype or cfg.dtype
    with torch.device("meta"):
        model = family.build(cfg)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    resident, expert_keys, fused = sort_keys(ckpt, family, cfg, expected)
    missing = sorted(expected - set(resident))
    if missing:
        raise MoelocalError(
            f"{ckpt.dir}: checkpoint lacks tensor {missing[0]} ({len(missing)} missing)"
        )

    state = {name: ckpt.get(key).to(device=device, dtype=dtype) for name, key in resident.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MoelocalError(
            f"{ckpt.dir}: weights do not match config.json ({e})".split("\n")[0]
        ) from None
    model.rotary = Rotary(family.rope_dim(cfg), cfg.rope).to(device)

    layout = ExpertLayout(cfg.hidden_size, cfg.moe_intermediate_size)
    experts = ResidentExperts(layout, activation(cfg.hidden_act))
    for layer, is_moe in enumerate(cfg.moe_layers):
        if is_moe:
            blob = torch.empty(cfg.num_experts, layout.numel, dtype=dtype, device=device)
            fill_expert_blobs(ckpt, cfg, layer, blob, layout, expert_keys, fused)
            experts.add_layer(layer, blob)
            model.model.layers[layer].mlp.experts = experts
    return LoadedModel(family, cfg, model.eval(), experts)


def fill_expert_blobs(ckpt, cfg, layer, blob, layout, expert_keys, fused):
    """Copy one layer's experts from the checkpoint into their blobs, checking every shape."""
    I, D = layout.I, layout.D  # noqa: E741
    if (layer, "gate_up_proj") in fused and (layer, "down_proj") in fused:
        gate_up = read(ckpt, fused[layer, "gate_up_proj"], (cfg.num_experts, 2 * I, D))
        layout.gate_up(blob).copy_(gate_up)
        layout.down(blob).copy_(read(ckpt, fused[layer, "down_proj"], (cfg.num_experts, D, I)))
        return
    for e in range(cfg.num_experts):
        keys = {part: expert_keys.get((layer, e, part)) for part in ("gate", "up", "down")}
        for part, key in keys.items():
            if key is None:
                raise MoelocalError(
                    f"{ckpt.dir}: checkpoint lacks the {part} matrix of expert {e} in layer {layer}"
                )
        gate_up = layout.gate_up(blob[e])
        gate_up[:I].copy_(read(ckpt, keys["gate"], (I, D)))
        gate_up[I:].copy_(read(ckpt, keys["up"], (I, D)))
        layout.down(blob[e]).copy_(read(ckpt, keys["down"], (D, I)))


def read(ckpt: Checkpoint, key: str, shape: tuple) -> torch.Tensor:
    t = ckpt.get(key)
    if tuple(t.shape) != shape:
        raise MoelocalError(
            f"{ckpt.dir}: {key} has shape {tuple(t.shape)}, config.json implies {shape}"
        )
    return t
