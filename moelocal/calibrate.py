"""`moelocal calibrate`: run text through a model, recording the hidden state after each layer's
attention, and fit the prefetcher's guesses of later layers' routing to it (predictor.py)."""

from dataclasses import dataclass, replace

import torch

from . import predictor
from .errors import MoelocalError
from .models.attention import KVCache
from .models.moe import MoE
from .plan import OffloadOptions
from .prefetch import guessed_from

CHUNK = 512  # tokens per forward pass: the text runs as independent passages of this length
MIN_TOKENS = 256  # fewer leave too few held-out tokens to judge a fit on


class HiddenRecorder:
    """Stands in for the model's prefetcher: keeps every layer's hidden state after its attention
    on the CPU, in the model's dtype (as the prefetcher sees it): tokens x hidden size x layers x
    2 bytes in bf16, 7 GB for 8192 tokens of a DeepSeek-V3; calibrate such a model on fewer."""

    def __init__(self, n_layers: int):
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

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


@torch.no_grad()
def record(model, ids: list[int], device) -> list[torch.Tensor]:
    """Each layer's hidden states after attention for the text, run CHUNK tokens at a time."""
    recorder, prefetcher = HiddenRecorder(model.cfg.num_hidden_layers), model.prefetcher
    model.prefetcher = recorder
    try:
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            model(torch.tensor([chunk], device=device), KVCache(len(recorder.rows), len(chunk)))
    finally:
        model.prefetcher = prefetcher
    return [torch.cat(rows) for rows in recorder.rows]


@torch.no_grad()
def calibrate(engine, text: str, max_tokens: int, depth: int = 1,
              margin: int = OffloadOptions.prefetch_margin):  # fmt: skip
    """Fits for every pair the prefetcher guesses at depths 1..`depth` -> (RoutePredictors,
    [PairFit])."""
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
    pairs = sorted({(s, t) for d in range(1, depth + 1)
                    for s, targets in guessed_from(moe, d).items() for t in targets})  # fmt: skip
    for source, target in pairs:
        fitted, router, best = fit_pair(layers[target], hidden[source], hidden[target], margin)
        if fitted is not None:
            maps[(source, target)] = fitted
        fits.append(PairFit(source, target, router, best, fitted is not None))
    return predictor.RoutePredictors(maps), fits


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
