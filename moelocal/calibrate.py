"""`moelocal calibrate`: run text through a model, recording the hidden state after each layer's
attention, and fit to it the prefetcher's guesses of later layers' routing and the expert
cache's guesses of each layer's next steps (predictor.py)."""

from dataclasses import dataclass, replace

import torch

from . import predictor
from .errors import MoelocalError
from .models.attention import KVCache
from .models.moe import MoE
from .plan import OffloadOptions
from .prefetch import EMBEDDING, guessed_from, next_token_target
from .slot_map import simulate, waits_for_reads

CHUNK = 512  # tokens per forward pass: the text runs as independent passages of this length
MIN_TOKENS = 256  # fewer leave too few held-out tokens to judge a fit on


class HiddenRecorder:
    """Stands in for the model's prefetcher: keeps every layer's hidden state after its attention
    (and the embedding, as source EMBEDDING) on the CPU, in the model's dtype (as the prefetcher
    sees it): tokens x hidden size x layers x 2 bytes in bf16, 7 GB for 8192 tokens of a
    DeepSeek-V3; calibrate such a model on fewer."""

    def __init__(self, n_layers: int):
        self.rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(EMBEDDING, n_layers)}

    def wanted(self, i: int) -> bool:
        return True

    def __call__(self, layers, i: int, h: torch.Tensor):
        self.rows[i].append(h.reshape(-1, h.shape[-1]).cpu())


@dataclass
class PairFit:
    source: int
    target: int
    router_recall: float  # the target's router on the held-out tokens (k + margin guesses)
    fitted_recall: float  # the best fit's
    kept: bool


@dataclass
class ReuseFit:
    layer: int
    lru_hit_rate: float  # held-out, mean over CACHED shares of the layer's experts
    fitted_hit_rate: float  # evicting by the best fit's scores
    kept: bool


CACHED = (0.25, 0.5, 0.75)  # shares of a layer's experts in slots that a reuse fit is judged at


@torch.no_grad()
def record(model, ids: list[int], device) -> dict[int, torch.Tensor]:
    """Each layer's hidden states after attention for the text (and EMBEDDING's), run CHUNK
    tokens at a time."""
    n_layers = model.cfg.num_hidden_layers
    recorder, prefetcher = HiddenRecorder(n_layers), model.prefetcher
    model.prefetcher = recorder
    try:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            model(torch.tensor([chunk], device=device), KVCache(n_layers, len(chunk)))
    finally:
        model.prefetcher = prefetcher
    return {i: torch.cat(rows) for i, rows in recorder.rows.items()}


@torch.no_grad()
def calibrate(engine, text: str, max_tokens: int, depth: int = 1,
              margin: int = OffloadOptions.prefetch_margin):  # fmt: skip
    """Fits for every pair the prefetcher guesses at depths 1..`depth`, and for every MoE
    layer's next steps -> (RoutePredictors, [PairFit], [ReuseFit])."""
    ids = engine.encode(text)[:max_tokens]
    if len(ids) < MIN_TOKENS:
        raise MoelocalError(f"the text is {len(ids)} tokens; calibrating needs at least "
                            f"{MIN_TOKENS} (a few pages of what the model will run)")  # fmt: skip
    model = engine.model
    layers = model.model.layers
    moe = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, MoE)]
    if not moe:
        raise MoelocalError(f"{engine.model_dir}: no routed experts, nothing to guess")
    hidden = record(model, ids, engine.device)
    maps, fits = {}, []
    # the next token's layer 0 is guessed through the head and the embedding's map: no pair
    pairs = sorted({(s, t) for d in range(1, depth + 1)
                    for s, targets in guessed_from(moe, d).items() for t in targets
                    if not next_token_target(s, t)})  # fmt: skip
    for source, target in pairs:
        fitted, router, best = fit_pair(layers[target], hidden[source], hidden[target], margin)
        if fitted is not None:
            maps[(source, target)] = fitted
        fits.append(PairFit(source, target, router, best, fitted is not None))
    reuse, reuse_fits = {}, []
    ends = torch.arange(len(ids)) // CHUNK * CHUNK + CHUNK  # the passage each token ran in
    ends = ends.clamp(max=len(ids))
    cache = engine.expert_cache
    waits = cache is None or waits_for_reads(cache.expert_bytes)  # as its slot maps do
    for i in moe:
        fitted, lru, best = fit_reuse_of(layers[i], hidden[i], ends, waits)
        if fitted is not None:
            reuse[i] = fitted
        reuse_fits.append(ReuseFit(i, lru, best, fitted is not None))
    return predictor.RoutePredictors(maps, reuse), fits, reuse_fits


def fit_pair(layer, source: torch.Tensor, target: torch.Tensor, margin: int):
    """predictor.fit for MoE layer `layer` from the hidden states after an earlier layer's
    attention (source) and after its own (target), judged by the recall of k + margin guesses
    routed as the layer routes."""
    norm, gate, cfg = layer.post_attention_layernorm, layer.mlp.gate, layer.mlp.cfg
    device, dtype = norm.weight.device, norm.weight.dtype
    x = norm(source.to(device, dtype)).float().cpu()
    real = gate(norm(target.to(device, dtype))).float().cpu()
    k = min(cfg.num_experts, cfg.num_experts_per_tok + margin)
    guess_cfg = replace(cfg, num_experts_per_tok=k)
    bias = getattr(gate, "e_score_correction_bias", None)
    bias = bias.float().cpu() if bias is not None else None

    def judge(logits, real_logits):
        return predictor.recall(logits, real_logits, guess_cfg, cfg, bias)

    router_bias = None if gate.bias is None else gate.bias.float().cpu()
    return predictor.fit(x, real, gate.weight.float().cpu(), router_bias, judge)


def fit_reuse_of(layer, hidden: torch.Tensor, ends: torch.Tensor, wait_for_reads: bool):
    """predictor.fit_reuse for MoE layer `layer` from the hidden states after its attention,
    normed as its experts see them, judged by the hits of its slot map (slot_map.SlotMap's
    wait_for_reads) on the held-out tokens' routing at CACHED shares of its experts."""
    norm, moe = layer.post_attention_layernorm, layer.mlp
    device, dtype = norm.weight.device, norm.weight.dtype
    x = norm(hidden.to(device, dtype))
    ids = moe.route(x)[0].cpu()
    x = x.float().cpu()
    E = moe.cfg.num_experts
    split = len(ids) - max(1, int(len(ids) * predictor.HELD_OUT))  # as fit_reuse splits
    held = [set(row) for row in ids[split:].tolist()]
    counts = sorted({min(E - 1, max(1, round(E * share))) for share in CACHED})

    def judge(scores):
        expected = scores.tolist() if scores is not None else None
        policy = "learned" if scores is not None else "lru"
        hits = sum(simulate(held, n, policy, expected, wait_for_reads) for n in counts)
        return hits / (sum(map(len, held)) * len(counts))

    return predictor.fit_reuse(x, ids, ends, E, judge)
