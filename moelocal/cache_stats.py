"""The expert cache's counts, per MoE layer, and the ratios `--json`, `chat /stats` and `bench`
report.

Every needed expert is one of: a hit (in the cache, not brought there for this use), a prefetch
used (brought by a guess, landed or still on its way) or a miss (loaded on demand, or on CUDA
computed on the CPU where its weights are). Bytes moved are every byte copied into the expert
cache's slots after load, by a miss or by a prefetch: bytes_from_disk + bytes_from_host.
"""

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    uses: int = 0  # experts needed, once per layer call
    hits: int = 0
    prefetch_used: int = 0
    misses: int = 0
    cpu_computed: int = 0  # misses run on the CPU from the host store (CUDA)
    prefetch_issued: int = 0
    guesses_skipped: int = 0  # steps the layer was not guessed: guessing it did not pay
    predicted_needed: int = 0  # needed experts that the prefetcher had guessed
    needed_with_guess: int = 0  # needed experts in layer calls that had a guess
    bytes_from_disk: int = 0
    bytes_from_host: int = 0
    stall_s: float = 0.0  # waiting for an expert to land or for a slot to free up

    def add(self, other: "LayerStats", sign: int = 1):
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + sign * getattr(other, name))

    def summary(self, expert_bytes: int) -> dict:
        """The --json view of these counts, with the ratios derived from them."""
        return {
            "expert_uses": self.uses,
            "hits": self.hits,
            "prefetch_used": self.prefetch_used,
            "misses": self.misses,
            "cpu_computed": self.cpu_computed,
            # needed experts already in the cache; with prefetch_used, the share found there
            "hit_rate": ratio(self.hits, self.uses),
            "prefetch_issued": self.prefetch_issued,
            "guesses_skipped": self.guesses_skipped,
            "prefetch_precision": ratio(self.prefetch_used, self.prefetch_issued),
            "prefetch_recall": ratio(self.predicted_needed, self.needed_with_guess),
            # of the needed experts the cache did not hold, the share a guess had begun to read:
            # what prefetch can hide (recall counts cached experts too, the easy ones to guess)
            "prefetch_coverage": ratio(self.prefetch_used, self.prefetch_used + self.misses),
            "bytes_moved": self.bytes_from_disk + self.bytes_from_host,
            "demand_bytes": (self.misses - self.cpu_computed) * expert_bytes,
            "prefetch_bytes": self.prefetch_issued * expert_bytes,
            "bytes_from_disk": self.bytes_from_disk,
            "bytes_from_host": self.bytes_from_host,
            "stall_s": round(self.stall_s, 6),
        }


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    preload_bytes: int = 0
    preload_s: float = 0.0  # reading experts into their slots at load
    preread_bytes: int = 0  # of preload_bytes, read before the cache existed (preread.py)

    def layer(self, i: int) -> LayerStats:
        return self.layers.setdefault(i, LayerStats())

    def total(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers.values():
            total.add(s)
        return total

    def copy(self) -> "CacheStats":
        out = CacheStats(preload_bytes=self.preload_bytes, preload_s=self.preload_s,
                         preread_bytes=self.preread_bytes)  # fmt: skip
        for i, s in self.layers.items():
            out.layer(i).add(s)
        return out

    def since(self, before: "CacheStats") -> "CacheStats":
        out = self.copy()
        for i, s in before.layers.items():
            out.layer(i).add(s, sign=-1)
        out.preload_bytes -= before.preload_bytes
        out.preload_s -= before.preload_s
        out.preread_bytes -= before.preread_bytes
        return out

    def as_dict(self, expert_bytes: int) -> dict:
        return {
            **self.total().summary(expert_bytes),
            "expert_bytes": expert_bytes,
            "preload_bytes": self.preload_bytes,
            "preload_s": round(self.preload_s, 6),
            "preread_bytes": self.preread_bytes,
            "per_layer": {str(i): s.summary(expert_bytes) for i, s in sorted(self.layers.items())},
        }


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0
