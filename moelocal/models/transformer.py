"""The decoder stack: embeddings, decoder layers (attention, then a dense MLP or a MoE block),
final norm and head. Built with its expert provider and, when streaming, its prefetcher."""

from functools import partial

import torch
from torch import nn

from ..config import ModelConfig
from ..prefetch import EMBEDDING
from .attention import Attention, KVCache, attention_mask
from .common import MLP, Rotary, norm, project
from .linear_attention import GatedDeltaNet
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, attention_cls=Attention, experts=None):
        super().__init__()
        self.window = cfg.sliding_windows[layer]
        self.residual_multiplier = cfg.residual_multiplier
        if cfg.linear_layers[layer]:
            self.linear_attn = GatedDeltaNet(cfg, layer)
        else:
            self.self_attn = attention_cls(cfg, layer)
        if cfg.moe_layers[layer]:
            self.mlp = MoE(cfg, layer, experts)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        self.input_layernorm = norm(cfg, cfg.hidden_size)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size)
        self.layer = layer

    def route(self, h: torch.Tensor, extra: int = 0, gate=None):
        """The experts this layer's MoE block would pick for hidden state h (B, T, D), with
        `extra` more (its router or `gate` scoring them): (ids, weights), or None for a dense
        layer."""
        if not isinstance(self.mlp, MoE):
            return None
        x = self.post_attention_layernorm(h).reshape(-1, h.shape[-1])
        return self.mlp.route(x, extra, gate)

    def forward(self, x, rope, kv: KVCache, masks, after_attention=None):
        if hasattr(self, "linear_attn"):
            out = self.linear_attn(self.input_layernorm(x), kv)
        else:
            out = self.self_attn(self.input_layernorm(x), rope, kv, masks[self.window])
        h = self.residual(x, out)
        if after_attention is not None:  # the prefetcher sees h before the MoE block runs
            after_attention(h)
        return self.residual(h, self.mlp(self.post_attention_layernorm(h)))

    def residual(self, x, out):
        """x plus a block's output (Granite: times residual_multiplier)."""
        return x + out if self.residual_multiplier == 1.0 else x + out * self.residual_multiplier


class Body(nn.Module):
    """`model.*` in the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, attention_cls, experts=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, attention_cls, experts) for i in range(cfg.num_hidden_layers)
        )
        self.norm = norm(cfg, cfg.hidden_size)


class Transformer(nn.Module):
    """experts: the routed experts' provider (expert_cache.ExpertCache); prefetcher: called after
    each layer's attention with the layers, that layer's index and the hidden state
    (prefetch.Prefetcher)."""

    def __init__(self, cfg: ModelConfig, attention_cls=Attention, rope_dim: int | None = None,
                 experts=None, prefetcher=None):  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg, attention_cls, experts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.rotary = Rotary(rope_dim or cfg.head_dim, cfg.rope)
        self.prefetcher = prefetcher
        self.route_predictors = None  # fitted guesses of later layers' routing (the loader's)

    def forward(self, tokens: torch.Tensor, kv: KVCache, last_only: bool = False):
        """tokens (B, T) at positions kv.length.. -> logits (B, T, V) in float32."""
        B, T = tokens.shape
        start = kv.length
        x = self.embed(tokens)
        positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if kv.pads is not None:
            positions = (positions - kv.pads.to(tokens.device)[:, None]).clamp(min=0)
        rope = self.rotary(positions, x.dtype)
        # a padded batch is only decoded, a row at a time (generate prefills prompts alone)
        assert kv.pads is None or T == 1, "left-padded prompts are prefilled one by one"
        masks = {w: attention_mask(start, T, w, x.device)
                 for w in set(self.cfg.sliding_windows)}  # fmt: skip
        layers = self.model.layers
        if self.prefetcher is not None and self.prefetcher.wanted(EMBEDDING):
            self.prefetcher(layers, EMBEDDING, x)  # layer 0's experts, from the embedding
        for i, layer in enumerate(layers):
            guess = None
            if self.prefetcher is not None and self.prefetcher.wanted(i):
                guess = partial(self.prefetcher, layers, i)
            x = layer(x, rope, kv, masks, guess)
        kv.length += T
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) -> their embeddings (..., D), as layer 0 is given them."""
        x = self.model.embed_tokens(tokens)
        return x * self.cfg.embedding_multiplier if self.cfg.embedding_multiplier != 1.0 else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output (..., D) -> logits (..., V) in float32."""
        logits = project(self.lm_head, self.model.norm(x))
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        return logits.float()

    def likeliest_next(self, h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n likeliest next tokens (B, n) and their probabilities (B, n), read off h (B, D),
        a hidden state before the last layer's output, by the head (a "logit lens"): the
        prefetcher's guess of the token to come while this one is still being computed."""
        probs, ids = self.head(h).softmax(-1).topk(n, -1)
        return ids, probs
