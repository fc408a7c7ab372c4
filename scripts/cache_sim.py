"""Expert cache policies replayed on a routing trace: LRU, LFU, LRU-2, decayed frequency,
moelocal's learned eviction (where the trace has its scores) and Belady's offline optimum.

    python scripts/cache_sim.py TRACE        # a trace from `moelocal bench --trace TRACE`

A trace is one layer's routing, token by token: trace[t] is the set of experts token t needs.
The cache holds `slots` experts. As in moelocal, a token's cached experts are used first, then
its misses are loaded one by one; an expert the token has already used may be evicted for the
next miss (so one slot still serves a top-2 token). The hit rate is hits / expert uses.
"""


class LRU:
    def __init__(self, trace):
        self.last: dict[int, int] = {}

    def use(self, t: int, e: int):
        self.last[e] = t

    def victim(self, t: int, held: set[int]) -> int:
        return min(held, key=self.last.__getitem__)


class LFU(LRU):
    """Least frequently used so far (over the whole trace), ties to the least recently used."""

    def __init__(self, trace):
        super().__init__(trace)
        self.count: dict[int, int] = {}

    def use(self, t: int, e: int):
        super().use(t, e)
        self.count[e] = self.count.get(e, 0) + 1

    def victim(self, t: int, held: set[int]) -> int:
        return min(held, key=lambda e: (self.count[e], self.last[e]))


class LRU2(LRU):
    """LRU-K with K = 2: evict the expert whose use before its last is oldest (an expert used once
    goes first), ties to the least recently used: recency that a one-off use cannot buy."""

    def __init__(self, trace):
        super().__init__(trace)
        self.before: dict[int, int] = {}

    def use(self, t: int, e: int):
        if self.last.get(e) != t:
            self.before[e] = self.last.get(e, -1)
        self.last[e] = t

    def victim(self, t: int, held: set[int]) -> int:
        return min(held, key=lambda e: (self.before.get(e, -1), self.last[e]))


class Decayed(LRU):
    """Frequency with a half-life of HALF_LIFE tokens: evict the lowest sum of 2^(-age / half-life)
    over past uses, ties to the least recently used."""

    HALF_LIFE = 4.0

    def __init__(self, trace):
        super().__init__(trace)
        self.score: dict[int, tuple[float, int]] = {}  # expert -> (score, token it was made at)

    def value(self, e: int, t: int) -> float:
        score, at = self.score.get(e, (0.0, t))
        return score * 0.5 ** ((t - at) / self.HALF_LIFE)

    def use(self, t: int, e: int):
        self.score[e] = (self.value(e, t) + 1.0, t)
        self.last[e] = t

    def victim(self, t: int, held: set[int]) -> int:
        return min(held, key=lambda e: (self.value(e, t), self.last[e]))


class Learned(LRU):
    """moelocal's learned policy (slot_map.Learned): evict the lowest of the scores a fitted map
    gave each expert at this token (scores[t], from the trace or from the model's hidden states)."""

    def __init__(self, trace, scores):
        super().__init__(trace)
        self.scores = scores

    def victim(self, t: int, held: set[int]) -> int:
        return min(held, key=self.scores[t].__getitem__)


def learned(scores):
    """The Learned policy for one layer's scores, as hit_rate takes a policy."""
    return lambda trace: Learned(trace, scores)


class Belady:
    """Evict the expert whose next use is farthest away: no policy misses less (Belady 1966)."""

    def __init__(self, trace):
        self.uses: dict[int, list[int]] = {}  # expert -> the tokens that use it, latest first
        for t in range(len(trace) - 1, -1, -1):
            for e in trace[t]:
                self.uses.setdefault(e, []).append(t)
        self.end = len(trace)

    def use(self, t: int, e: int):
        while self.uses[e] and self.uses[e][-1] <= t:
            self.uses[e].pop()

    def victim(self, t: int, held: set[int]) -> int:
        return max(held, key=lambda e: self.uses[e][-1] if self.uses[e] else self.end)


def hit_rate(trace: list[set[int]], slots: int, policy_cls) -> float:
    policy = policy_cls(trace)
    held: set[int] = set()
    hits = uses = 0
    for t, needed in enumerate(trace):
        uses += len(needed)
        for e in needed & held:
            hits += 1
            policy.use(t, e)
        for e in sorted(needed - held):
            if len(held) >= slots:
                held.remove(policy.victim(t, held))
            held.add(e)
            policy.use(t, e)
    return hits / uses


POLICIES = {"LRU": LRU, "LFU": LFU, "LRU-2": LRU2, "decayed frequency": Decayed, "Belady": Belady}


def main():
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from moelocal.trace import RoutingTrace

    ap = argparse.ArgumentParser(description="LRU, LFU and Belady hit rates on a routing trace")
    ap.add_argument("trace", type=Path)
    args = ap.parse_args()
    trace = RoutingTrace.load(args.trace)
    layers, scores = trace.by_layer(), trace.expected_by_layer()
    E = trace.header["experts"]
    print(f"{trace.header.get('model')}: {len(trace.steps)} layer calls, {len(layers)} MoE layers"
          f", {len(scores)} with learned eviction scores")  # fmt: skip
    print("| policy | " + " | ".join(f"{s} slots" for s in range(1, E)) + " |")
    print("|---" * E + "|")
    policies = {name: {i: p for i in layers} for name, p in POLICIES.items()}
    if scores:  # the learned policy where the model had fits, LRU elsewhere (as moelocal does)
        policies["learned"] = {i: learned(scores[i]) if i in scores else LRU for i in layers}
    for name, by_layer in policies.items():
        rates = [sum(hit_rate(t, s, by_layer[i]) for i, t in layers.items()) / len(layers)
                 for s in range(1, E)]  # fmt: skip
        print(f"| {name} | " + " | ".join(f"{r:.3f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
