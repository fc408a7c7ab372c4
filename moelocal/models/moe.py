"""Mixture-of-experts routing and the MoE block: the router, the pure `route()` function, and the
dispatch (group tokens by expert, run each where its weights are, sum in a fixed order).

Routed experts are not parameters of the model: the block asks its expert provider (the expert
cache) for each selected expert's weights, and the cache never decides the math.
"""

from dataclasses import replace

import torch
from torch import nn

from ..config import ModelConfig
from ..quant import float_linear_any_rows, row_invariant_linear
from .common import MLP, gated_unit, project


class Router(nn.Module):
    """The gate: one logit per routed expert; DeepSeek-V3, GLM, ERNIE and MiniMax add a score
    correction bias (which picks experts, not weighs them), gpt-oss a plain bias to the logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_linear_bias else None
        if cfg.router_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts))
        self.fp32 = cfg.router_fp32

    def forward(self, x):
        if x.is_cuda and not self.fp32 and self.weight.dtype == x.dtype:
            return row_invariant_linear(x, self.weight, self.bias)
        # in float32 (see router_dtype), each token's logits the same bits at any row count
        logits = float_linear_any_rows(x, self.weight, self.bias)
        return logits if self.fp32 else logits.to(x.dtype)


def router_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype routers are kept in. On the CPU, float32: a bf16/fp16 GEMV with a few dozen
    output rows takes 2-3x longer there than in float32, and products of half-precision numbers
    are exact in float32, so the logits differ at most in summation order before rounding."""
    return torch.float32 if device.type == "cpu" else dtype


def route(logits: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None = None):
    """Router logits (N, E) -> expert ids (N, K) and their weights (N, K) in float32.

    A pure function: the MoE block calls it before any expert math, and the prefetcher calls it on
    the next layer's router to guess which experts to load.
    """
    K, E = cfg.num_experts_per_tok, cfg.num_experts
    if cfg.scoring == "sigmoid":  # DeepSeek-V3: bias picks the experts, the plain scores weigh them
        scores = logits.float().sigmoid()
        choice = scores + bias if bias is not None else scores
        group_scores = choice.view(-1, cfg.n_group, E // cfg.n_group).topk(2, dim=-1)[0].sum(-1)
        choice = choice.masked_fill(~group_mask(group_scores, cfg), float("-inf"))
        ids = choice.topk(K, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor
    if cfg.scoring == "sparsemixer":
        return sparsemixer(logits, cfg.router_jitter)
    if cfg.scoring == "topk_softmax":  # gpt-oss: the top-k logits, weighed by their softmax
        top, ids = logits.topk(K, dim=-1)
        return ids, top.softmax(dim=-1, dtype=torch.float32)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    if cfg.topk_method == "group_limited_greedy":  # DeepSeek-V2: best experts of the best groups
        group_scores = probs.view(-1, cfg.n_group, E // cfg.n_group).max(dim=-1).values
        probs = probs.masked_fill(~group_mask(group_scores, cfg), 0.0)
    if bias is not None:  # ERNIE: the bias picks the experts, the plain probabilities weigh them
        ids = (probs + bias).topk(K, dim=-1)[1]
        weights = probs.gather(1, ids)
    else:
        weights, ids = probs.topk(K, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=cfg.norm_topk_min)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return ids, weights


def sparsemixer(logits: torch.Tensor, jitter: float):
    """Phi-3.5-MoE's top-2 (inference): the best expert, then the best of the others, each
    weighed by a softmax over the logits within 2 * jitter (relatively) of it."""

    def pick(among):
        top, ids = among.max(dim=-1, keepdim=True)
        near = (top - logits) / logits.abs().clamp(min=top) <= 2 * jitter
        weights = among.masked_fill(~near, float("-inf")).softmax(dim=-1, dtype=torch.float32)
        return ids, weights.gather(-1, ids)

    first, w1 = pick(logits)
    second, w2 = pick(logits.scatter(-1, first, float("-inf")))
    return torch.cat((first, second), dim=-1), torch.cat((w1, w2), dim=-1)


def group_mask(group_scores: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(N, n_group) scores -> (N, E) bool: True for experts of the top `topk_group` groups."""
    top = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
    return mask.repeat_interleave(cfg.num_experts // cfg.n_group, dim=-1)


class MoE(nn.Module):
    """Route, run the selected experts, weigh and sum them (+ the shared experts).

    The routed experts are not parameters: `experts` (expert_cache.ExpertCache) hands out each
    selected expert's weights when they can be read, and this block does the math."""

    def __init__(self, cfg: ModelConfig, layer: int, experts=None):
        super().__init__()
        self.cfg, self.layer, self.experts = cfg, layer, experts
        self.glu = gated_unit(cfg)
        self.gate = Router(cfg)
        self.guess_cfgs: dict[int, ModelConfig] = {}  # extra experts -> routing config
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(
                cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act, cfg.mlp_bias
            )
        if cfg.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor, extra: int = 0, gate=None):
        """x (N, D) -> expert ids (N, K + extra) and weights; extra > 0 is a prefetcher's wider
        guess (its weights are not the block's), `gate` a stand-in for the router that makes it
        (predictor.RoutePredictors)."""
        cfg = self.cfg
        if extra:
            if extra not in self.guess_cfgs:
                k = min(cfg.num_experts, cfg.num_experts_per_tok + extra)
                self.guess_cfgs[extra] = replace(cfg, num_experts_per_tok=k)
            cfg = self.guess_cfgs[extra]
        logits = (gate or self.gate)(x)
        return route(logits, cfg, getattr(self.gate, "e_score_correction_bias", None))

    def forward(self, x):
        B, T, D = x.shape
        state = x[:, -1]  # each sequence's last token: its next steps' routing grows from it
        x = x.reshape(-1, D)
        y = self.routed_experts(x, *self.route(x), state)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(project(self.shared_expert_gate, x)) * shared
            y = y + shared
        return y.view(B, T, D)

    def routed_experts(self, x, ids, weights, state=None) -> torch.Tensor:
        """Sum over the K selected experts of weight × expert(x): x (N, D), ids/weights (N, K).
        Each expert runs where its weights are, as soon as the cache can hand them out; state
        (B, D), each sequence's last row of x, is what the cache may score its evictions by."""
        rows = ids.tolist()
        needed = sorted({e for row in rows for e in row})
        routed = group_by_expert(rows, ids, weights, needed)
        tokens = {e: len(rows) if isinstance(t, slice) else len(t) for e, (t, _) in routed.items()}
        layout, outputs = self.experts.layout, {}
        for e, views, device in self.experts.experts(self.layer, needed, tokens, state):
            token, weight = routed[e]
            xs = x if isinstance(token, slice) else x[token]
            if device == x.device:
                outputs[e] = token, layout.forward(xs, views, self.glu, weight)
            else:  # CUDA: a miss computed on the CPU, where its weights are
                y = layout.forward(xs.to(device), views, self.glu).to(x.device, non_blocking=True)
                outputs[e] = token, (y * weight).to(x.dtype)
        return sum_in_expert_order(x, needed, outputs)


def group_by_expert(rows: list[list[int]], ids: torch.Tensor, weights: torch.Tensor,
                    needed: list[int]) -> dict:  # fmt: skip
    """Expert -> (its tokens, their weights (n, 1)): index tensors, or for a single token (each
    decode step) a slice, which spares the gathers and scatters of a dozen small ops a layer.
    `rows` is ids as a list."""
    if len(rows) == 1:
        return {e: (slice(None), weights[:, k : k + 1]) for k, e in enumerate(rows[0])}
    routed = {}
    for e in needed:
        token, k = torch.nonzero(ids == e, as_tuple=True)
        routed[e] = (token, weights[token, k, None])
    return routed


def sum_in_expert_order(x: torch.Tensor, needed: list[int], outputs: dict) -> torch.Tensor:
    """The experts' outputs summed in expert order, so the same whatever was cached or arrived
    first, each rounded to x's dtype before it is added (as index_add_ does)."""
    out = None
    for e in needed:
        token, y = outputs[e]
        if isinstance(token, slice):  # one token: 0 + y is y, so the first needs no add
            out = y.to(x.dtype) if out is None else out.add_(y.to(x.dtype))
        else:
            out = torch.zeros_like(x) if out is None else out
            out.index_add_(0, token, y.to(x.dtype))
    return out
