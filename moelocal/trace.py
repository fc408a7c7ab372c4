"""Routing traces: which experts each MoE layer needed, step by step, as the expert cache saw
them. `moelocal bench --trace FILE` records the decode of a row; scripts/cache_sim.py replays a
trace through cache policies (LRU, LFU, Belady's optimum).

A trace is JSON lines: a header {"moe_layers", "experts", "top_k", "model"}, then one line per
MoE layer call {"layer", "experts", "routed", "guesses"} in the order they ran: the experts the
layer needed (for one sequence's decode, the token's top k), how many (token, expert) pairs were
routed to them, and the prefetcher's guesses of them (best first) made d layers before, by d
("1", "2", ...; layer 0's "0" from the embedding, and d from the head d layers before the
previous token's end: prefetch.GuessRecorder, prefetch.ahead), for scripts/replay_trace.py to
replay; where the model has fitted eviction scores, "expected": each expert's, as the learned
policy saw them.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoelocalError, reason
from .slot_map import simulate


@dataclass
class RoutingTrace:
    header: dict
    steps: list[tuple[int, list[int], int]] = field(default_factory=list)  # layer, experts, routed
    guesses: list[dict[int, list[int]]] = field(default_factory=list)  # per step: depth -> guess
    pending: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # layer's, until it runs
    expected: list[list[float] | None] = field(default_factory=list)  # per step: eviction scores

    def guess(self, layer: int, depth: int, ranked: list[int]):
        """The prefetcher's guess of layer's experts, made `depth` layers before it runs."""
        self.pending.setdefault(layer, {})[depth] = ranked

    def record(self, layer: int, experts: list[int], routed: int, expected=None):
        """expected: the step's eviction scores, a list or a call that makes it, or None."""
        self.steps.append((layer, sorted(experts), routed))
        self.guesses.append(self.pending.pop(layer, {}))
        scores = expected() if callable(expected) else expected
        self.expected.append([round(x, 4) for x in scores] if scores is not None else None)

    def expected_by_layer(self) -> dict[int, list[list[float]]]:
        """Each layer's eviction scores, step by step, for the layers that had them all."""
        out: dict[int, list] = {}
        for (layer, _, _), scores in zip(self.steps, self.expected, strict=True):
            out.setdefault(layer, []).append(scores)
        return {i: rows for i, rows in out.items() if all(r is not None for r in rows)}

    def by_layer(self) -> dict[int, list[set[int]]]:
        """Each layer's sequence of needed-expert sets."""
        out: dict[int, list[set[int]]] = {}
        for layer, experts, _ in self.steps:
            out.setdefault(layer, []).append(set(experts))
        return out

    def lru_hit_rate(self, slots: int | list[int]) -> float:
        """The share of needed experts an LRU cache of `slots` per layer (or each MoE layer's,
        in order) would have held."""
        layers = self.by_layer()
        counts = slots if isinstance(slots, list) else [slots] * len(layers)
        pairs = list(zip(sorted(layers), counts, strict=False))
        hits = sum(lru_hits(layers[layer], n) for layer, n in pairs)
        uses = sum(len(needed) for layer, _ in pairs for needed in layers[layer])
        return hits / uses if uses else 0.0

    def hit_rate(self, slots: list[int], wait_for_reads: bool = True) -> float:
        """The share of needed experts moelocal's default policy would have held with each MoE
        layer's `slots` (in order): the learned eviction's where the trace has its scores
        (slot_map.simulate; wait_for_reads as the cache's slot maps), else LRU's."""
        layers, scores = self.by_layer(), self.expected_by_layer()
        hits = uses = 0
        for layer, n in zip(sorted(layers), slots, strict=False):
            steps = layers[layer]
            uses += sum(map(len, steps))
            if layer in scores:
                hits += simulate(steps, n, "learned", scores[layer], wait_for_reads)
            else:
                hits += lru_hits(steps, n)
        return hits / uses if uses else 0.0

    def save(self, path: Path):
        lines = [json.dumps(self.header)]
        for (layer, e, n), g, x in zip(self.steps, self.guesses, self.expected, strict=True):
            step = {"layer": layer, "experts": e, "routed": n, "guesses": g}
            lines.append(json.dumps(step | ({"expected": x} if x is not None else {})))
        try:
            Path(path).write_text("\n".join(lines) + "\n")
        except OSError as e:
            raise MoelocalError(f"--trace {path}: {reason(e)}") from None

    @staticmethod
    def check_path(path: Path):
        """A path a trace may be written to: new, or an earlier trace (nothing else is
        overwritten), in a directory that exists."""
        path = Path(path)
        if not path.parent.is_dir():
            raise MoelocalError(f"--trace {path}: no such directory {path.parent}")
        if path.exists():
            RoutingTrace.load(path)  # refuses what is not a trace

    @classmethod
    def load(cls, path: Path) -> "RoutingTrace":
        try:
            lines = Path(path).read_text().splitlines()
            trace = cls(json.loads(lines[0]))
            trace.header["moe_layers"]  # noqa: B018
            for line in lines[1:]:
                step = json.loads(line)
                for depth, ranked in step.get("guesses", {}).items():
                    trace.guess(int(step["layer"]), int(depth), [int(e) for e in ranked])
                expected = step.get("expected")
                expected = [float(x) for x in expected] if expected is not None else None
                trace.record(int(step["layer"]), [int(e) for e in step["experts"]],
                             int(step["routed"]), expected)  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise MoelocalError(f"{path}: not a routing trace ({e})") from None
        return trace


def lru_hits(steps: list[set[int]], n_slots: int) -> int:
    """Hits of an LRU cache of n_slots on one layer's needed-expert sets."""
    hits, recent = 0, []  # least recently used first
    for needed in steps:
        hits += sum(e in recent for e in needed)
        recent = [e for e in recent if e not in needed] + sorted(needed)
        recent = recent[max(0, len(recent) - n_slots) :]
    return hits
