"""Router-logit prefetch: after a layer's attention, guess the next layer's experts and start
loading the ones that are not cached.

The hidden state entering layer L+1 is close to the one leaving layer L's attention (the residual
stream changes slowly), so layer L+1's own norm and router applied to it are a good guess. The
guess is the same pure `route()` the MoE block uses, with a margin of extra experts.
"""

from dataclasses import replace

import torch

from .expert_cache import ExpertCache
from .models.common import MoE, Transformer, route


class Prefetcher:
    def __init__(self, model: Transformer, cache: ExpertCache, margin: int = 1):
        cfg = model.cfg
        self.model, self.cache = model, cache
        self.guess_cfg = replace(
            cfg, num_experts_per_tok=min(cfg.num_experts, cfg.num_experts_per_tok + margin)
        )
        for layer in model.model.layers:
            layer.after_attention = self

    @torch.no_grad()
    def __call__(self, layer: int, h: torch.Tensor):
        layers = self.model.model.layers
        if layer + 1 >= len(layers) or not isinstance(layers[layer + 1].mlp, MoE):
            return
        nxt = layers[layer + 1]
        x = nxt.post_attention_layernorm(h).reshape(-1, h.shape[-1])
        gate = nxt.mlp.gate
        ids, _ = route(gate(x), self.guess_cfg, getattr(gate, "e_score_correction_bias", None))
        # rank by how many tokens chose each expert: for one token, the router's own order
        votes = torch.bincount(ids.flatten(), minlength=self.guess_cfg.num_experts)
        ranked = [e for e in votes.argsort(descending=True, stable=True).tolist() if votes[e] > 0]
        self.cache.prefetch(layer + 1, ranked)
