"""Router-logit prefetch: after a layer's attention, guess the next layer's experts and start
loading the ones that are not cached.

The hidden state entering layer L+1 is close to the one leaving layer L's attention (the residual
stream changes slowly), so layer L+1's own `route()` applied to it is a good guess, taken with a
margin of extra experts.
"""

from collections import Counter

import torch

# a guess rank is loaded only while at least this share of its guesses turned out needed. A right
# guess hides one read; a wrong one costs two: its own, and the miss for the expert it evicted. So
# a guess pays when p > 2 (1 - p). (mixtral-large int4 under a 1536 MiB cap: prefetch on/off
# 0.98x with 1/2, 1.05x with 0.7.)
MIN_PRECISION = 2 / 3


class GuessRanks:
    """Per rank in the prefetcher's guesses (best first): how often a guess of that rank that
    was not cached (one worth a read) was needed by its layer. Counts of routing only, never
    timings, so what is loaded does not depend on how fast a run happened to be."""

    def __init__(self):
        self.guessed: list[int] = []
        self.needed: list[int] = []

    def record(self, uncached: list[tuple[int, int]], needed: set[int]):
        """uncached: (rank, expert) of the guesses that were not cached when guessed."""
        for r, e in uncached:
            while r >= len(self.guessed):
                self.guessed.append(0)
                self.needed.append(0)
            self.guessed[r] += 1
            self.needed[r] += e in needed

    def worth_loading(self, rank: int) -> bool:
        """True while this rank's guesses are needed often enough (an unseen rank is tried)."""
        if rank >= len(self.guessed):
            return True
        return (self.needed[rank] + 1) / (self.guessed[rank] + 2) >= MIN_PRECISION


class Prefetcher:
    def __init__(self, cache, margin: int = 1):
        self.cache, self.margin = cache, margin

    @torch.no_grad()
    def __call__(self, layer, h: torch.Tensor):
        """layer: the next DecoderLayer; h: the hidden state after this layer's attention;
        the cache is an expert_cache.ExpertCache."""
        guess = layer.route(h, self.margin)
        if guess is None:  # a dense layer
            return
        rows = guess[0].tolist()  # one transfer from the device per layer
        # rank by how many tokens chose each expert, ties in the router's order (stable sort)
        votes = Counter(e for row in rows for e in row)
        self.cache.prefetch(layer.layer, sorted(votes, key=votes.__getitem__, reverse=True))
