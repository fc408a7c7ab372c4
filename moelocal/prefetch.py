"""Router-logit prefetch: after a layer's attention, guess a later layer's experts and start
loading the ones that are not cached, where guessing pays.

The hidden state entering layer L+1 is close to the one leaving layer L's attention (the residual
stream changes slowly), so layer L+1's own `route()` applied to it is a good guess, taken with a
margin of extra experts; layers further on are guessed the same way, less well.
"""

import time
from collections import Counter

import torch

# a guess rank is loaded only while at least this share of its guesses turned out needed. A wrong
# guess evicts nothing (it is read into a spare row), but until its layer runs its read shares the
# disk with the right guesses' reads: a guess pays when p > 1 - p. (The default model's routing:
# the top-k ranks are needed 0.7-0.94 of the time, the margin's about 1 in 5.)
MIN_PRECISION = 1 / 2
# a layer whose guesses do not pay is guessed again (a probe) FIRST_PROBE runs after its first
# loss, and each probe that loses again doubles the wait, up to PROBE runs: one unlucky early
# guess costs a few runs unguessed, a layer that never pays a probe every PROBE-th run
FIRST_PROBE = 8
PROBE = 128
DECAY = 0.9  # the weight of a layer's earlier guesses in its payoff, per run
TRACE_DEPTH = 4  # a routing trace holds the guesses of each layer from up to this many before
# the source of layer 0's guess: the token's embedding, before layer 0's attention. Layer 0's
# hidden state is mostly the embedding, so its router names nearly all of a token's experts
# there from it (the default model: 0.98 with k + 1 guesses, against 0.34-0.38 for its router on
# the state after the previous token's last attention), while nothing earlier in the step can.
# Its read gets the attention's time as a head start.
EMBEDDING = -1
# the head's likeliest next tokens a guess of the next token's layer 0 weighs: on the default
# model 1 names 0.75 of layer 0's experts with k + 1 guesses in a greedy decode, 4 0.81, 16
# 0.79 (sampled at temperature 1: 0.55, 0.59, 0.61)
NEXT_TOKENS = 4


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


class Payoff:
    """Whether guessing one layer's experts pays, from what its recent guesses saved (the
    expert cache reckons it when the layer runs: the waits its needed guesses spared, less the
    CPU time its loads took from compute and the time making the guess took; routing ahead is
    not free, ~50 us a layer on the CPU). Where guessing does not pay (the layer's experts are
    cached already, loads are quicker than routing, take the CPU or wait behind the layers' own
    misses, or the guesses are wrong) the layer is guessed only now and then (a probe, FIRST_PROBE
    to PROBE runs apart), to notice when it would. Decided as the layer runs, so that asking
    costs one attribute: this is asked of every layer, every step."""

    def __init__(self):
        self.gain = 0.0  # seconds saved by recent guesses, older ones weighing less
        self.passed = 0  # runs without a guess since the last guess
        self.wait = 0  # while guessing does not pay: runs from one probe to the next
        self.due = True  # guess the layer's next run (a layer never guessed is guessed)
        self.recorded = False

    @property
    def probing(self) -> bool:
        """No guess of this layer has paid yet: the next one loads only its best expert, so
        that finding out costs little (on mixtral-large, 3 wrong 19 MB reads a layer did)."""
        return not self.recorded or self.gain < 0

    def ran(self, guessed: bool):
        """The layer ran, with or without a guess: decide about its next run. A run without a
        guess ages the record too, so that by the next probe an old loss weighs little and the
        probe decides (else one wrong 19 MB read, -20 ms against the +2 ms a right guess saves,
        kept mixtral-large's layers from guessing for a thousand runs). A guess that lost, its
        loads' or only its routing's cost, waits twice as long as the one before it (FIRST_PROBE
        to PROBE runs): with a fixed PROBE a layer whose first guess lost (one wrong expert)
        went unguessed for PROBE runs, 1 or 2 of the default model's 6 layers for the whole of
        a 64-token replay; and where guesses that load nothing were made again at once (to find
        something out), the default model's layers with their experts cached mostly were
        guessed at every step for a routing's cost each (on / off 0.91 at 2 slots of 8)."""
        if not guessed:
            self.passed += 1
            self.gain *= DECAY
        else:
            self.passed = 0
            self.wait = 0 if self.gain >= 0 else min(max(2 * self.wait, FIRST_PROBE), PROBE)
        self.due = self.gain >= 0 or self.passed >= self.wait - 1

    def record(self, saved_s: float):
        """What a guess of this layer saved (negative: cost)."""
        self.gain = DECAY * self.gain + saved_s
        self.recorded = True


class Prefetcher:
    """After layer L's attention, guess the experts of layer L + depth (layer 0 guesses layers
    1..depth) and have the cache load the uncached ones: each layer is guessed once a step,
    `depth` layers before it runs. A deeper guess leaves its loads more time and is right less
    often. A MoE layer 0 is guessed twice: for the token to come, `depth` layers before this
    one's end, from the tokens the head reads off the hidden state there (`guess_next`; needs
    `model`, the Transformer); then from the token's embedding, before its attention."""

    def __init__(self, cache, margin: int = 1, depth: int = 1, predictors=None):
        self.cache, self.margin, self.predictors = cache, margin, predictors
        self.targets = guessed_from(sorted(cache.slots), depth)
        self.model = None  # the Transformer, whose head guesses the next token (the loader's)

    def wanted(self, i: int) -> bool:
        """Does layer i's hidden state make a guess this step? (Cheap: asked every layer.)"""
        return any(self.cache.due(t) for t in self.targets.get(i, ()))

    @torch.no_grad()
    def __call__(self, layers, i: int, h: torch.Tensor):
        """layers: the DecoderLayers; i: the layer whose attention made h, the hidden state after
        it (EMBEDDING: the embedding); the cache is an expert_cache.ExpertCache."""
        for target in self.targets[i]:
            if self.cache.due(target):
                start = time.perf_counter()
                ranked = guess_of(self.model, layers, i, target, h, self.margin, self.predictors)
                if ranked is not None:
                    self.cache.prefetch(target, ranked, time.perf_counter() - start)
        if i not in self.cache.slots:  # a dense layer: no misses of its own to go first
            self.cache.start_guesses()


def guessed_from(moe_layers: list[int], depth: int) -> dict[int, list[int]]:
    """Layer i -> the MoE layers guessed from the hidden state after its attention: each MoE
    layer `depth` layers before it (layer 0 guesses layers 1..depth). Where layer 0 is MoE:
    EMBEDDING -> [0], and the layer `depth` - 1 before the last MoE layer guesses the next
    token's layer 0 too (next_token_target), layer 1 at the earliest: layer 0's attention comes
    before this token's layer 0 has run (a model whose only MoE layer is 0 has no such guess)."""
    targets = {i: [t for t in moe_layers if (1 if i == 0 else i + depth) <= t <= i + depth]
               for i in range(max(moe_layers, default=0))}  # fmt: skip
    if 0 not in moe_layers:
        return targets
    if moe_layers[-1] > 0:
        targets.setdefault(max(1, moe_layers[-1] + 1 - depth), []).append(0)
    return {EMBEDDING: [0]} | targets


def next_token_target(source: int, target: int) -> bool:
    """Is a guess of target from source's hidden state one of the next token's?"""
    return source != EMBEDDING and target <= source


def ahead(source: int, target: int, last: int) -> int:
    """How many layers before target runs a guess of it from source is made (a trace's depth):
    0 from the embedding, the next token's counted on from `last`, the last MoE layer."""
    if source == EMBEDDING:
        return 0
    return last + 1 - source if next_token_target(source, target) else target - source


def guess_of(model, layers, source: int, target: int, h: torch.Tensor, margin: int,
             predictors=None) -> list[int] | None:  # fmt: skip
    """The guess of target made from source's h: the next token's through the head (guess_next;
    None without the model), else from a router (guess)."""
    if not next_token_target(source, target):
        return guess(layers, source, target, h, margin, predictors)
    return guess_next(model, layers, h, margin, predictors) if model is not None else None


def guess(layers, source: int, target: int, h: torch.Tensor, margin: int,
          predictors=None) -> list[int]:  # fmt: skip
    """MoE layer `target`'s experts for h, the hidden state after layer `source`'s attention,
    with `margin` more, best first: ranked by how many tokens chose each, ties in the router's
    order. Scored by the fitted map for the pair where there is one (predictor.py), else by
    the target's own router."""
    gate = predictors.gate(source, target) if predictors is not None else None
    rows = layers[target].route(h, margin, gate)[0].tolist()  # one transfer from the device
    votes = Counter(e for row in rows for e in row)
    return sorted(votes, key=votes.__getitem__, reverse=True)


@torch.no_grad()
def guess_next(model, layers, h: torch.Tensor, margin: int, predictors=None) -> list[int]:
    """Layer 0's experts for the token each sequence decodes next, from h, a hidden state of
    this step's (B, T, D), best first, k + margin a sequence: the head's NEXT_TOKENS likeliest
    next tokens (read off the last position's h), each one's top k in layer 0 from its
    embedding (as EMBEDDING's guess makes them) weighed by its probability. Layer 0's own
    router on h names few of them: the token to come is not in h, and layer 0's experts
    follow from the token."""
    ids, probs = model.likeliest_next(h[:, -1], NEXT_TOKENS)
    gate = predictors.gate(EMBEDDING, 0) if predictors is not None else None
    rows = layers[0].route(model.embed(ids), 0, gate)[0]  # (B * NEXT_TOKENS, k)
    B, E = ids.shape[0], layers[0].mlp.cfg.num_experts
    weights = probs.reshape(-1, 1).expand_as(rows).reshape(B, -1).float()
    votes = torch.zeros(B, E, device=rows.device).scatter_add_(1, rows.reshape(B, -1), weights)
    top = votes.topk(min(E, rows.shape[1] + margin), -1)
    picked, values = torch.stack((top.indices.float(), top.values)).tolist()  # one transfer
    count, weight = Counter(), Counter()
    for row, row_values in zip(picked, values, strict=True):
        for e, w in zip(row, row_values, strict=True):
            if w > 0:  # named by one of the likeliest tokens
                count[int(e)] += 1
                weight[int(e)] += w
    return sorted(count, key=lambda e: (count[e], weight[e]), reverse=True)


class GuessRecorder:
    """Stands in for a model's prefetcher (or its absence) while a routing trace is recorded:
    after each layer's attention it also has the trace note the guesses a prefetcher of any
    depth up to TRACE_DEPTH would make from it, each by how far ahead it is made (`ahead`), so
    that a replay can try every depth. model: the Transformer, for the next token's guesses."""

    def __init__(self, prefetcher, trace, moe_layers: list[int], margin: int, predictors=None,
                 model=None):  # fmt: skip
        self.prefetcher, self.trace, self.margin = prefetcher, trace, margin
        self.predictors, self.model = predictors, model
        self.last = max(moe_layers, default=0)
        self.targets: dict[int, list[int]] = {}
        for depth in range(1, TRACE_DEPTH + 1):
            for source, targets in guessed_from(moe_layers, depth).items():
                known = self.targets.setdefault(source, [])
                known += [t for t in targets if t not in known]

    def wanted(self, i: int) -> bool:
        return bool(self.targets.get(i)) or (self.prefetcher is not None
                                             and self.prefetcher.wanted(i))  # fmt: skip

    @torch.no_grad()
    def __call__(self, layers, i: int, h: torch.Tensor):
        if self.prefetcher is not None and self.prefetcher.wanted(i):
            self.prefetcher(layers, i, h)
        for target in self.targets.get(i, ()):
            ranked = guess_of(self.model, layers, i, target, h, self.margin, self.predictors)
            if ranked is not None:
                self.trace.guess(target, ahead(i, target, self.last), ranked)
