"""Router-logit prefetch: after a layer's attention, guess the next layer's experts and start
loading the ones that are not cached.

The hidden state entering layer L+1 is close to the one leaving layer L's attention (the residual
stream changes slowly), so layer L+1's own `route()` applied to it is a good guess, taken with a
margin of extra experts.
"""

from collections import Counter

import torch

from .expert_cache import ExpertCache


class Prefetcher:
    def __init__(self, cache: ExpertCache, margin: int = 1):
        self.cache, self.margin = cache, margin

    @torch.no_grad()
    def __call__(self, layer, h: torch.Tensor):
        """layer: the next DecoderLayer; h: the hidden state after this layer's attention."""
        guess = layer.route(h, self.margin)
        if guess is None:  # a dense layer
            return
        rows = guess[0].tolist()  # one transfer from the device per layer
        # rank by how many tokens chose each expert, ties in the router's order (stable sort)
        votes = Counter(e for row in rows for e in row)
        self.cache.prefetch(layer.layer, sorted(votes, key=votes.__getitem__, reverse=True))
