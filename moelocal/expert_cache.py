"""The device expert cache: per MoE layer a fixed tensor of slots, a map expert -> slot, an eviction
policy, and the MoE math over whatever is cached.

Slots are preallocated once, shaped like a stacked layer: (n_slots, bytes of one expert's blob,
quantized or not). A miss copies one blob into a free or evicted slot; the math gathers by slot.
An expert in use by the running layer or being loaded (a prefetch in flight) is never evicted.
Expert outputs are summed in expert order, whatever order they arrived in, so the tokens are the
same for every budget, policy and prefetch setting. All bookkeeping happens on the main thread;
I/O threads only fill memory.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .experts import ExpertLayout
from .store import DiskReader, release_freed_memory


class LRU:
    """Evict the least recently used expert."""

    def __init__(self):
        self.order: OrderedDict[int, None] = OrderedDict()

    def insert(self, e: int):
        """e was just loaded."""
        self.order[e] = None
        self.order.move_to_end(e)

    def touch(self, e: int):
        """e was just used."""
        self.insert(e)

    def remove(self, e: int):
        self.order.pop(e, None)

    def victim(self, candidates: set[int]) -> int:
        return next(e for e in self.order if e in candidates)


class LFU(LRU):
    """Evict the least frequently used expert (uses counted since load); ties go to LRU."""

    def __init__(self):
        super().__init__()
        self.uses: dict[int, int] = {}

    def touch(self, e: int):
        super().touch(e)
        self.uses[e] = self.uses.get(e, 0) + 1

    def victim(self, candidates: set[int]) -> int:
        rank = {e: i for i, e in enumerate(self.order)}
        return min(candidates, key=lambda e: (self.uses.get(e, 0), rank[e]))


POLICIES = {"lru": LRU, "lfu": LFU}


@dataclass
class LayerStats:
    uses: int = 0  # experts needed, once per layer call
    hits: int = 0  # of them already cached or on their way (a prefetch)
    misses: int = 0  # of them loaded on demand (or, CUDA, computed on the CPU)
    cpu_computed: int = 0  # misses run on the CPU from host RAM (CUDA miss policy)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    predicted_needed: int = 0  # needed experts that the prefetcher had guessed
    needed_with_guess: int = 0  # needed experts in layer calls that had a guess
    bytes_from_disk: int = 0
    bytes_from_host: int = 0
    stall_s: float = 0.0

    def add(self, other: "LayerStats", sign: int = 1):
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + sign * getattr(other, name))

    def summary(self, expert_bytes: int) -> dict:
        """The --json view of these counts, with the ratios derived from them."""
        return {
            "expert_uses": self.uses,
            "hits": self.hits,
            "misses": self.misses,
            "cpu_computed": self.cpu_computed,
            "hit_rate": ratio(self.hits, self.uses),
            "recall": ratio(self.hits, self.uses),
            "prefetch_issued": self.prefetch_issued,
            "prefetch_used": self.prefetch_used,
            "prefetch_precision": ratio(self.prefetch_used, self.prefetch_issued),
            "prefetch_recall": ratio(self.predicted_needed, self.needed_with_guess),
            # bytes_moved: what misses loaded (misses × expert size); prefetch_bytes: what the
            # prefetcher loaded; bytes_from_*: both, by the tier they came from
            "bytes_moved": (self.misses - self.cpu_computed) * expert_bytes,
            "prefetch_bytes": self.prefetch_issued * expert_bytes,
            "bytes_from_disk": self.bytes_from_disk,
            "bytes_from_host": self.bytes_from_host,
            "stall_s": round(self.stall_s, 6),
        }


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    preload_bytes: int = 0

    def layer(self, i: int) -> LayerStats:
        return self.layers.setdefault(i, LayerStats())

    def total(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers.values():
            total.add(s)
        return total

    def copy(self) -> "CacheStats":
        out = CacheStats(preload_bytes=self.preload_bytes)
        for i, s in self.layers.items():
            out.layer(i).add(s)
        return out

    def since(self, before: "CacheStats") -> "CacheStats":
        out = self.copy()
        for i, s in before.layers.items():
            out.layer(i).add(s, sign=-1)
        out.preload_bytes -= before.preload_bytes
        return out

    def as_dict(self, expert_bytes: int) -> dict:
        return {
            **self.total().summary(expert_bytes),
            "expert_bytes": expert_bytes,
            "preload_bytes": self.preload_bytes,
            "per_layer": {str(i): s.summary(expert_bytes) for i, s in sorted(self.layers.items())},
        }


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def routes(rows: list[list[int]], ids: torch.Tensor, weights: torch.Tensor, needed: list) -> dict:
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


class Load:
    """An expert on its way into a slot: wait() returns once compute may read the slot."""

    def __init__(self, future=None, event=None):
        self.future, self.event = future, event

    def done(self) -> bool:
        return (self.future is None or self.future.done()) and (
            self.event is None or self.event.query()
        )

    def wait(self):
        if self.future is not None:
            result = self.future.result()  # re-raises an I/O error
            if isinstance(result, torch.cuda.Event):  # disk -> device: the copy's event
                self.event = result
        if self.event is not None:
            # compute waits on the copy's event, not on a global synchronize
            torch.cuda.current_stream().wait_event(self.event)


class LayerCache:
    def __init__(self, n_slots: int, layout: ExpertLayout, device, policy: str):
        self.slots = torch.empty(n_slots, layout.nbytes, dtype=torch.uint8, device=device)
        self.views = [layout.views(slot) for slot in self.slots]  # typed segments, per slot
        self.expert_in: list[int | None] = [None] * n_slots
        self.slot_of: dict[int, int] = {}
        self.loading: dict[int, Load] = {}
        self.pinned: set[int] = set()  # in use by the running layer
        self.prefetched: set[int] = set()  # loaded by a prefetch, not used yet
        self.guess: set[int] | None = None  # the prefetcher's last guess for this layer
        self.policy = POLICIES[policy]()


class ExpertCache:
    """Routed experts of every MoE layer, streamed through fixed device slots."""

    def __init__(
        self, layout: ExpertLayout, act, reader: DiskReader, moe_layers: list[int],
        n_experts: int, n_slots: int, device: torch.device, policy: str = "lru",
        host_experts: int = 0, miss_policy: str = "load",
    ):  # fmt: skip
        self.layout, self.act, self.reader = layout, act, reader
        self.n_experts, self.n_slots, self.device = n_experts, n_slots, device
        self.expert_bytes = layout.nbytes
        self.layers = {i: LayerCache(n_slots, layout, device, policy) for i in moe_layers}
        self.stats = CacheStats()
        self.cuda = device.type == "cuda"
        # CUDA: experts kept in pinned host RAM, copied on their own stream
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._preload(host_experts)
        release_freed_memory()  # the preload's temporaries, if experts were converted as read
        self.reader.trim = self.streaming  # and from now on after every such miss
        self.miss_policy = miss_policy if self.cuda and self.host else "load"
        if self.miss_policy == "auto":
            self.copy_s, self.cpu_token_s = self._calibrate()

    @property
    def streaming(self) -> bool:
        """True when some experts live below the device cache."""
        return self.n_slots < self.n_experts

    # ---- loading -------------------------------------------------------------------------

    def _preload(self, host_experts: int):
        """Fill the host store (CUDA) and every slot, so a big enough budget never misses."""
        per_layer = host_experts // max(1, len(self.layers)) if self.cuda else 0
        for layer in self.layers:
            for e in range(min(per_layer, self.n_experts)):
                blob = torch.empty(self.layout.nbytes, dtype=torch.uint8).pin_memory()
                self.host[layer, e] = self.reader.read(layer, e, blob)
                self.stats.preload_bytes += self.expert_bytes
        for layer, lc in self.layers.items():
            for slot in range(self.n_slots):
                e = slot
                src = self.host.get((layer, e))
                if src is not None:
                    lc.slots[slot].copy_(src)
                elif self.cuda:
                    lc.slots[slot].copy_(self.reader.read(layer, e, self._pinned_staging()))
                else:
                    self.reader.read(layer, e, lc.slots[slot])
                lc.expert_in[slot], lc.slot_of[e] = e, slot
                lc.policy.insert(e)
                self.stats.preload_bytes += self.expert_bytes

    def _calibrate(self) -> tuple[float, float]:
        """Start-up measurements for the miss cost model: seconds to copy one expert to the
        GPU, and seconds for the CPU to run one expert on one token."""
        blob = next(iter(self.host.values()))
        on_device = torch.empty_like(blob, device=self.device)
        x = torch.randn(1, self.layout.D, dtype=self.layout.dtype)
        views = self.layout.views(blob)

        def copy():
            on_device.copy_(blob)
            torch.cuda.synchronize(self.device)  # start-up only: measures the copy

        def compute():
            self.layout.forward(x, views, self.act)

        timings = []
        for fn in (copy, compute):
            fn()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            timings.append((time.perf_counter() - t0) / 3)
        return timings[0], timings[1]

    def _on_cpu(self, layer: int, e: int, n_tokens: int) -> bool:
        """CUDA miss policy: run a missing expert where its weights are (host RAM) or copy it."""
        if self.miss_policy == "load" or (layer, e) not in self.host:
            return False
        return self.miss_policy == "cpu" or n_tokens * self.cpu_token_s < self.copy_s

    def _evictable(self, lc: LayerCache, protect: set[int]) -> set[int]:
        for e in [e for e, load in lc.loading.items() if load.done()]:
            self._finish(lc, e)
        busy = lc.pinned | set(lc.loading) | protect
        return {e for e in lc.slot_of if e not in busy}

    def _finish(self, lc: LayerCache, e: int):
        lc.loading.pop(e).wait()

    def _free_slot(self, lc: LayerCache, protect: set[int], wait: bool) -> int | None:
        """A slot to load into: an empty one, or the policy's victim among evictable experts."""
        if None in lc.expert_in:
            return lc.expert_in.index(None)
        candidates = self._evictable(lc, protect)
        while not candidates and wait and lc.loading:
            self._finish(lc, next(iter(lc.loading)))  # a prefetch in flight: let it land
            candidates = self._evictable(lc, protect)
        if not candidates:
            return None
        victim = lc.policy.victim(candidates)
        slot = lc.slot_of.pop(victim)
        lc.policy.remove(victim)
        lc.prefetched.discard(victim)
        lc.expert_in[slot] = None
        return slot

    def _start_load(self, layer: int, lc: LayerCache, e: int, slot: int):
        lc.expert_in[slot], lc.slot_of[e] = e, slot
        lc.policy.insert(e)
        dest = lc.slots[slot]
        stats = self.stats.layer(layer)
        src = self.host.get((layer, e))
        if not self.cuda:
            lc.loading[e] = Load(self.reader.submit(self.reader.read, layer, e, dest))
            stats.bytes_from_disk += self.expert_bytes
            return
        # the copy stream must not overwrite a slot that queued compute may still read
        compute_done = torch.cuda.current_stream().record_event()
        if src is not None:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(compute_done)
                dest.copy_(src, non_blocking=True)
                lc.loading[e] = Load(event=self.copy_stream.record_event())
            stats.bytes_from_host += self.expert_bytes
        else:
            lc.loading[e] = Load(
                self.reader.submit(self._disk_to_device, layer, e, dest, compute_done)
            )
            stats.bytes_from_disk += self.expert_bytes

    def _disk_to_device(self, layer, e, dest, compute_done):
        """I/O thread, CUDA: disk -> pinned staging -> slot on the copy stream."""
        staging = self.reader.read(layer, e, self._pinned_staging())
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(compute_done)
            dest.copy_(staging, non_blocking=True)
            done = self.copy_stream.record_event()
        done.synchronize()  # this thread's staging buffer is reused by its next read
        return done

    def _pinned_staging(self) -> torch.Tensor:
        local = self.reader.local
        if not hasattr(local, "pinned"):
            local.pinned = torch.empty(self.layout.nbytes, dtype=torch.uint8).pin_memory()
        return local.pinned

    # ---- the MoE layer -------------------------------------------------------------------

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """Sum over the K selected experts of weight × expert(x): x (N, D), ids/weights (N, K)."""
        lc, stats = self.layers[layer], self.stats.layer(layer)
        rows = ids.tolist()
        needed = sorted({e for row in rows for e in row})
        routed = routes(rows, ids, weights, needed)
        if not self.streaming:  # every expert has its slot: nothing to load, evict or guess
            stats.uses += len(needed)
            stats.hits += len(needed)
            outputs = {e: self._expert(x, lc.views[lc.slot_of[e]], routed[e]) for e in needed}
            return self._sum(x, needed, outputs)
        hits = [e for e in needed if e in lc.slot_of]
        misses = [e for e in needed if e not in lc.slot_of]
        stats.uses += len(needed)
        stats.hits += len(hits)
        stats.misses += len(misses)
        stats.prefetch_used += len(lc.prefetched.intersection(needed))
        lc.prefetched.difference_update(needed)
        if lc.guess is not None:
            stats.needed_with_guess += len(needed)
            stats.predicted_needed += len(lc.guess.intersection(needed))
            lc.guess = None
        lc.pinned.update(hits)
        try:
            outputs = self._run(layer, lc, x, routed, hits, misses)
        finally:
            lc.pinned.clear()  # an interrupted step (Ctrl-C) leaves nothing pinned
        return self._sum(x, needed, outputs)

    def _expert(self, x, views, route) -> tuple:
        """One expert on its tokens: (the tokens, their weighted outputs)."""
        token, weight = route
        rows = x if isinstance(token, slice) else x[token]
        return token, self.layout.forward(rows, views, self.act, weight)

    @staticmethod
    def _sum(x, needed, outputs) -> torch.Tensor:
        """The experts' outputs summed in expert order, so the same whatever was cached, each
        rounded to x's dtype before it is added (as index_add_ does)."""
        out = None
        for e in needed:
            token, y = outputs[e]
            if isinstance(token, slice):  # one token: 0 + y is y, so the first needs no add
                out = y.to(x.dtype) if out is None else out.add_(y.to(x.dtype))
            else:
                out = torch.zeros_like(x) if out is None else out
                out.index_add_(0, token, y.to(x.dtype))
        return out

    def _run(self, layer, lc, x, routed, hits, misses) -> dict:
        """Each needed expert's weighted output, hits first while the misses load."""
        stats = self.stats.layer(layer)
        on_cpu = [e for e in misses if self._on_cpu(layer, e, routed[e][1].shape[0])]
        stats.cpu_computed += len(on_cpu)
        queue = [e for e in misses if e not in on_cpu]

        def start_queued(wait: bool):
            while queue:
                slot = self._free_slot(lc, set(), wait)
                if slot is None:
                    return
                self._start_load(layer, lc, queue.pop(0), slot)
                lc.pinned.add(lc.expert_in[slot])

        start_queued(wait=False)
        outputs = {}
        for e in on_cpu:  # CUDA: where the weights are, while the GPU works on the rest
            token, weight = routed[e]
            blob = self.host[layer, e]
            y = self.layout.forward(x[token].cpu(), self.layout.views(blob), self.act)
            y = y.to(x.device, non_blocking=True)
            outputs[e] = (token, y * weight)
        for e in hits + [e for e in misses if e not in on_cpu]:  # hits compute while misses load
            if e not in lc.slot_of:
                start_queued(wait=True)
            if e in lc.loading:
                t0 = time.perf_counter()
                self._finish(lc, e)
                stats.stall_s += time.perf_counter() - t0
            outputs[e] = self._expert(x, lc.views[lc.slot_of[e]], routed[e])
            lc.pinned.discard(e)
            lc.policy.touch(e)
            start_queued(wait=False)
        return outputs

    # ---- prefetch ------------------------------------------------------------------------

    def prefetch(self, layer: int, ranked: list[int]):
        """Start loading the guessed experts (best first) that are not cached, while slots allow."""
        lc = self.layers[layer]
        lc.guess = set(ranked)
        ranked = ranked[: self.n_slots]  # the best guesses that can be cached at once
        protect = set(ranked)  # never evict one guess to make room for another
        for e in ranked:
            if e in lc.slot_of:
                continue
            slot = self._free_slot(lc, protect, wait=False)
            if slot is None:
                return
            self._start_load(layer, lc, e, slot)
            lc.prefetched.add(e)
            self.stats.layer(layer).prefetch_issued += 1

    def close(self):
        for lc in self.layers.values():
            for e in list(lc.loading):
                self._finish(lc, e)
        self.reader.close()
