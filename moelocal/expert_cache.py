"""The expert cache: per MoE layer a fixed number of slots on the compute device, its slot map
(slot_map.py), and a mover that fills slots (movers.py).

Slots are preallocated once, a row of one expert's blob bytes each (a layer's rows stacked like
its experts); a layer may have one slot more than another (what a budget holds beyond a slot for
every layer).
The MoE block (models/moe.py) asks for the experts a layer needs and gets each one's views as
soon as it can be read: hits at once, misses as their loads land. A layer's own misses are
queued before the loads of the guesses made during its attention, and read first (a guess reads
only while no miss does: io_queue.py). A guess is read into a spare row outside every layer's
slots, so that a wrong one evicts nothing: when its layer runs, one it turns out not to need is
dropped, queued or halfway through its read, and one it needs is promoted to a miss's priority
and its row swapped with the slot a miss would have taken (the slot's row becomes the spare).
After the first LEND_AFTER calls of each layer the spare rows become slots, for good, where they
would have saved more as slots than the guesses read into them saved (under a budget they came
out of the slots' room), or where the prefetcher's switch left guessing off in most of the calls.
All bookkeeping happens on the main thread; I/O threads only fill memory. The cache never decides
the math, so tokens are the same for every budget, policy and prefetch setting.
"""

import time
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .cache_stats import CacheStats
from .direct_io import ALIGN
from .experts import ExpertLayout
from .io_queue import DEMAND, GUESS
from .movers import Load
from .prefetch import FIRST_PROBE, GuessRanks, Payoff
from .slot_map import Learned, SlotMap, waits_for_reads
from .store import aligned_buffer, release_freed_memory

# after this many layer calls a MoE layer that the switch decided (a first guess and a first
# probe, FIRST_PROBE runs later: one early loss alone, as where the preload has cached a layer's
# experts, decides nothing), where it left at least LEND_UNGUESSED of them unguessed, the
# guesses' spare rows become slots: under a budget the rows come out of the slots' room, and
# idle they cost hits (mixtral-large int4, random routing, memcap 1024 MiB: 84% unguessed, hit
# rate 0.397 against prefetch off's 0.423, 0.92x of off). They become slots too where a slot
# more would have saved more: a miss's read for each of the receiving layers' misses of the
# expert it last evicted (which one slot more would still hold), against the seconds every
# guess saved (mixtral-large int4 under memcap 1536 MiB, each layer guessed once its first
# probe paid, not lent: on / off 0.93-1.01)
LEND_AFTER = 2 * FIRST_PROBE
LEND_UNGUESSED = 0.75


class Guess(NamedTuple):
    """The prefetcher's guess of a layer's experts, until the layer runs."""

    ranked: list[int]  # best first
    uncached: list[tuple[int, int]]  # (rank, expert) of those not cached when guessed
    loaded: list[tuple[int, Load]]  # those whose loads it started
    cost_s: float  # the time making it took


class ExpertCache:
    """Routed experts of every MoE layer, streamed through fixed slots."""

    def __init__(
        self, layout: ExpertLayout, mover, moe_layers: list[int], n_experts: int,
        n_slots: int | list[int], policy: str = "lru", preread=None, guess_rows: int = 0,
    ):  # fmt: skip
        """n_slots: every layer's, or each one's (in moe_layers' order); preread: an
        ExpertPreread the loader kept (preread.py), whose memory becomes the slots and whose
        rows are taken as they land; guess_rows: spare rows the prefetcher's guesses are read
        into (none: nothing is prefetched)."""
        self.layout, self.mover, self.device = layout, mover, mover.device
        self.n_experts = n_experts
        counts = n_slots if isinstance(n_slots, list) else [n_slots] * len(moe_layers)
        waits = waits_for_reads(layout.nbytes)
        self.maps = {i: SlotMap(n, policy, waits) for i, n in zip(moe_layers, counts, strict=True)}
        self.expert_bytes = layout.nbytes
        memory = preread.memory if preread is not None else {}
        # each layer's slot rows; a guess's row trades places with a slot's
        self.slots = {i: list(slot_rows(m.n_slots, layout.nbytes, self.device, memory.get(i)))
                      for i, m in self.maps.items()}  # fmt: skip
        self.views = {i: [layout.views(slot) for slot in slots] for i, slots in self.slots.items()}
        # some experts live below the device cache (checked on every layer call: kept)
        self.streaming = any(m.n_slots < n_experts for m in self.maps.values())
        rows = slot_rows(guess_rows, layout.nbytes, self.device) if guess_rows else []
        self.spares = SpareRows(list(rows))
        # layer -> expert -> (spare row, load): guesses read ahead of their layer
        self.guess_reads: dict[int, dict[int, tuple[torch.Tensor, Load]]] = {}
        self.adopting: dict[int, tuple[torch.Tensor, Load]] = {}  # the running layer's
        self.guesses: dict[int, Guess] = {}  # layer -> the prefetcher's last guess
        self.unstarted: list[int] = []  # layers guessed whose loads have not been started
        self.guess_ranks = GuessRanks()
        self.payoffs: dict[int, Payoff] = {}  # for each layer the prefetcher guesses
        self.decided = self.unguessed = 0  # layer calls the switch decided, and left unguessed
        self.lent = False  # the spare rows have become slots (those free then; the rest as freed)
        self.guesses_saved = 0.0  # seconds the guesses saved in those calls, all layers
        self.slot_more_hits = dict.fromkeys(self.maps, 0)  # misses one slot more would have hit
        self.stats = CacheStats()
        self.trace = None  # a trace.RoutingTrace to record each layer's needed experts into
        self.reuse: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # see evict_by()
        self.stats.preload_bytes += mover.host_experts * self.expert_bytes
        self._preload(preread)
        release_freed_memory()  # the preload's temporaries, if experts were converted as read

    @property
    def n_slots(self) -> dict[int, int]:
        """Each MoE layer's slots."""
        return {i: m.n_slots for i, m in self.maps.items()}

    @property
    def host_bytes(self) -> int:
        """Bytes of the host store (CUDA; page-locked RAM)."""
        return self.mover.host_experts * self.expert_bytes

    def _preload(self, preread=None):
        """Expert s of every layer into slot s, so that a big enough budget never misses: the
        rows a preread holds as they land, the others (and any it failed to read) by the mover."""
        loads, start = [], preread.started if preread is not None else time.perf_counter()
        early = preread.slots if preread is not None else 0

        def by_mover(layer: int, slot: int):
            load = self.mover.load(layer, slot, self.slots[layer][slot])
            load.start()
            loads.append((layer, slot, load))

        try:
            for slot in range(early, max(map(len, self.slots.values()), default=0)):
                for layer, rows in self.slots.items():
                    if slot < len(rows):
                        by_mover(layer, slot)
            for slot in range(early):
                for layer, rows in self.slots.items():
                    if slot >= len(rows):
                        continue
                    if preread.landed(layer, slot):
                        self.maps[layer].place(slot, slot)
                        self.stats.preload_bytes += self.expert_bytes
                        self.stats.preread_bytes += self.expert_bytes
                    else:
                        by_mover(layer, slot)
            for layer, slot, load in loads:
                load.wait()
                self.maps[layer].place(slot, slot)
                self.stats.preload_bytes += self.expert_bytes
            self.stats.preload_s += time.perf_counter() - start
        finally:
            for *_, load in loads:  # after a failure: no read still writing into a slot
                load.settle()

    # ---- the layer's experts -----------------------------------------------------------------

    def evict_by(self, reuse: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        """Layer -> a map (weight (E, D), bias (E)) from the state a layer call is given to each
        expert's expected uses in the steps to come (predictor.RoutePredictors.reuse): the
        layers whose policy is slot_map.Learned evict the lowest."""
        learned = {i for i, m in self.maps.items() if isinstance(m.policy, Learned)}
        self.reuse = {i: fit for i, fit in reuse.items() if i in learned}
        for i in learned:  # no layer keeps scores it is no longer given
            self.maps[i].policy.expected = None

    def experts(self, layer: int, needed: list[int], tokens: dict[int, int],
                state: torch.Tensor | None = None) -> Iterator:  # fmt: skip
        """(expert, views of its blob, their device) for each needed expert once it can be
        read: hits first, misses as they land. tokens: expert -> tokens routed to it; state:
        each sequence's last token's hidden state as the layer's experts see it (B, D)."""
        m, stats = self.maps[layer], self.stats.layer(layer)
        stats.uses += len(needed)
        fit = self.reuse.get(layer)
        expected = expected_uses(*fit, state) if fit is not None and state is not None else None
        if self.trace is not None:
            self.trace.record(layer, needed, sum(tokens.values()), expected)
        if not self.streaming:  # every expert has its slot: nothing to load, evict or guess
            stats.hits += len(needed)
            for e in needed:
                yield e, self.views[layer][m.slot_of[e]], self.device
            return
        wanted = set(needed)
        guessed = self._settle_guesses(layer, wanted)
        m.reap()
        if m.evicted in wanted and m.evicted not in m.slot_of:
            self.slot_more_hits[layer] += 1
        if fit is not None:
            m.policy.expected = expected
        in_slot = [e for e in needed if e in m.slot_of]
        guess = self.guesses.pop(layer, None)
        if guess is not None:
            stats.needed_with_guess += len(needed)
            stats.predicted_needed += len(wanted.intersection(guess.ranked))
            self.guess_ranks.record(guess.uncached, wanted)
            saved = self._saved(guess, wanted, len(needed) - len(in_slot))
            self.payoffs[layer].record(saved)
            self.guesses_saved += saved
        if layer in self.payoffs:
            self.payoffs[layer].ran(guess is not None)
            stats.guesses_skipped += guess is None
            self._judge_rows(guess is None)
        if self.lent:  # rows a guess was still reading into when they were lent
            self._lend_rows()
        stats.hits += len(in_slot)
        stats.prefetch_used += len(guessed)
        misses = [e for e in needed if e not in m.slot_of and e not in guessed]
        stats.misses += len(misses)
        on_host = [e for e in misses if self.mover.on_host(layer, e, tokens[e])]
        stats.cpu_computed += len(on_host)
        loaded = list(guessed) + [e for e in misses if e not in on_host]
        queue = list(loaded)  # those still waiting for a slot, in order (guesses read furthest)
        m.in_use.update(needed)
        self.adopting = guessed
        try:
            self._start_misses(layer, queue)
            self.start_guesses()  # the later layers', behind these misses
            ready = [e for e in in_slot if m.ready(e)]
            for e in ready:  # hits compute while the misses load
                yield e, self.views[layer][m.slot_of[e]], self.device
                self._used(layer, e, queue)
            for e in on_host:  # CUDA: on the CPU, while the GPU works on the rest
                yield e, self.mover.host_views(layer, e), torch.device("cpu")
                m.in_use.discard(e)
            for e in [e for e in in_slot if e not in ready] + loaded:
                while e not in m.slot_of:  # a miss that found no slot yet
                    self._start_misses(layer, queue)
                    if e not in m.slot_of:
                        self._wait_for_a_slot(layer)
                self._wait_landed(layer, e)
                yield e, self.views[layer][m.slot_of[e]], self.device
                self._used(layer, e, queue)
        finally:
            m.in_use.clear()  # an interrupted step (Ctrl-C) leaves nothing in use
            for row, load in self.adopting.values():  # its guesses never given a slot
                load.drop()
                self.spares.give(row, load)
            self.adopting = {}

    def _judge_rows(self, unguessed: bool):
        """Once LEND_AFTER layer calls a layer have been decided, lend the spare rows to the
        layers as slots if guessing was left off in most of them, or if as slots they would
        have saved more than the guesses did (for good: later guesses find no row and load
        nothing, so the switch keeps them rare)."""
        self.decided += 1
        self.unguessed += unguessed
        judged = LEND_AFTER * len(self.maps)
        if self.decided == judged and (self.unguessed >= LEND_UNGUESSED * judged
                                       or self._as_slots_s() > self.guesses_saved):  # fmt: skip
            self._lend_rows()

    def _receivers(self) -> list[int]:
        """The layers the spare rows would become slots of, a row each: the fewest slots first."""
        counts, out = {i: m.n_slots for i, m in self.maps.items()}, []
        for _ in self.spares.rows:  # as _lend_rows gives them
            out.append(min(counts, key=counts.__getitem__))
            counts[out[-1]] += 1
        return out

    def _as_slots_s(self) -> float:
        """Seconds the spare rows would have saved as slots so far: a miss's read for each miss
        of a receiving layer that one slot more would have hit (a layer given two rows counts
        its one slot more once)."""
        return sum(self.slot_more_hits[i] for i in set(self._receivers())) * (
            self.mover.load_seconds()[0])  # fmt: skip

    def _lend_rows(self):
        """Each spare row no read is writing becomes a slot of the layer with the fewest."""
        self.lent = True
        while (row := self.spares.take()) is not None:
            layer = min(self.maps, key=lambda i: self.maps[i].n_slots)
            self.maps[layer].add_slot()
            self.slots[layer].append(row)
            self.views[layer].append(self.layout.views(row))

    def _used(self, layer: int, e: int, queue: list[int]):
        """e has been computed: its slot may go to a miss still waiting for one."""
        m = self.maps[layer]
        m.in_use.discard(e)
        m.use(e)
        self._start_misses(layer, queue)

    def _read(self, layer: int, e: int, row: torch.Tensor, priority: int) -> Load:
        """Start loading expert e of layer into row."""
        load: Load = self.mover.load(layer, e, row)
        load.start(priority)
        stats = self.stats.layer(layer)
        if load.source == "host":
            stats.bytes_from_host += self.expert_bytes
        else:
            stats.bytes_from_disk += self.expert_bytes
        return load

    def _start_misses(self, layer: int, queue: list[int]):
        """Give the queued experts slots, in order, while slots are free: a needed guess's row
        (its read promoted already) trades places with its slot's, a miss starts its load."""
        m = self.maps[layer]
        while queue:
            slot = m.free_slot()
            if slot is None:
                return
            e = queue.pop(0)
            if e in self.adopting:
                row, load = self.adopting.pop(e)
                self.spares.give(self.slots[layer][slot])  # nothing reads or writes it now
                self.slots[layer][slot], self.views[layer][slot] = row, self.layout.views(row)
            else:
                load = self._read(layer, e, self.slots[layer][slot], DEMAND)
            m.start(e, slot, load)

    def _wait_landed(self, layer: int, e: int):
        """Block until e's load has landed. A failed or interrupted wait unmaps e: its slot is
        never read, nor written again until the read behind it has finished."""
        m = self.maps[layer]
        load = m.loading.get(e)
        if load is None:
            return
        t0 = time.perf_counter()
        try:
            load.wait()
        except BaseException:
            m.fail(e)
            raise
        finally:
            self.stats.layer(layer).stall_s += time.perf_counter() - t0
        del m.loading[e]

    def _wait_for_a_slot(self, layer: int):
        """Every slot is in use or loading: wait until a load not needed now (a guess already
        running) or a draining slot finishes."""
        m = self.maps[layer]
        busy = [t for e, t in m.loading.items() if e not in m.in_use] + list(m.draining.values())
        assert busy, "every slot is held by the running layer"
        t0 = time.perf_counter()
        while not any(t.done() for t in busy):
            time.sleep(0.0002)  # the loads finish on I/O threads or on the copy stream
        self.stats.layer(layer).stall_s += time.perf_counter() - t0
        m.reap()

    def _settle_guesses(self, layer: int, needed: set[int]) -> dict[int, tuple]:
        """The layer runs now: its guesses' reads that it needs (expert -> (row, load)), each
        promoted to a miss's priority; the others dropped, their rows spare again once nothing
        writes them (a failed read too: its expert is read again as a miss)."""
        kept = {}
        for e, (row, load) in self.guess_reads.pop(layer, {}).items():
            if e in needed and not (load.done() and not load.ok()):
                load.promote()
                kept[e] = row, load
            else:
                load.drop()
                self.spares.give(row, load)
        return kept

    # ---- prefetch ----------------------------------------------------------------------------

    def _saved(self, guess: Guess, needed: set[int], lacked: int) -> float:
        """Seconds a guess saved, its layer running now with `lacked` of its needed experts
        not in slots. As misses those would have been read together, costing about one miss's
        read in all, so each needed guess is credited with the part of its read done by now,
        at most a miss's whole read (a read beside compute runs slower than one compute waits
        for), divided among the `lacked`. Each load took its CPU time from compute (none on
        CUDA: a miss's is taken while compute waits for it anyway); making the guess took its
        time. A wrong guess evicted nothing: it was read into a spare row."""
        now, (wall, cpu) = time.perf_counter(), self.mover.load_seconds()
        saved = -guess.cost_s
        for e, load in guess.loaded:
            if e in needed:
                saved += min(load.head_start(now, wall), wall) / max(1, lacked)
            saved -= cpu
        return saved

    def due(self, layer: int) -> bool:
        """Should the prefetcher guess this MoE layer's experts this step?"""
        payoff = self.payoffs.get(layer)
        return payoff is None or payoff.due

    def prefetch(self, layer: int, ranked: list[int], cost_s: float = 0.0):
        """Note a guess of a layer's experts (best first); cost_s: the time making it took. Its
        loads start with start_guesses(), which the running layer calls once it has asked for
        its own misses: a guess read already running would share the disk with them. A second
        guess of the layer before it runs (layer 0's: the next token's, then its embedding's)
        replaces the first: the first's loads of experts it names go on, the others stop and
        their rows are spare again for its own. The later guess is made nearer its layer (the
        default model's embedding names 0.98 of layer 0's experts, the head 0.81), and with
        k spare rows the head's wrong guesses held the rows the embedding's right ones needed."""
        m = self.maps[layer]
        loaded, earlier = [], self.guesses.get(layer)
        if earlier is not None:
            loaded = [(e, load) for e, load in earlier.loaded if e in ranked]
            reads = self.guess_reads.get(layer, {})
            for e, load in earlier.loaded:
                if e not in ranked:
                    load.drop()
                    self.spares.give(reads.pop(e)[0], load)
            # the stopped loads took CPU time from compute all the same
            stopped = len(earlier.loaded) - len(loaded)
            cost_s += earlier.cost_s + stopped * self.mover.load_seconds()[1]
        uncached = [(r, e) for r, e in enumerate(ranked) if e not in m.slot_of]
        self.guesses[layer] = Guess(ranked, uncached, loaded, cost_s)
        self.payoffs.setdefault(layer, Payoff())
        self.unstarted.append(layer)

    def start_guesses(self):
        """Start reading what the guesses noted since the last call name and is not cached into
        spare rows, while rows are spare, behind every miss, and only the ranks whose guesses
        have been needed often enough; one only while the layer's guesses have not paid yet. A
        guess whose layer has run already is gone."""
        for layer in self.unstarted:
            guess, m = self.guesses.get(layer), self.maps[layer]
            if guess is None:
                continue
            reads = self.guess_reads.setdefault(layer, {})
            most = 1 if self.payoffs[layer].probing else len(guess.uncached)
            for rank, e in guess.uncached:
                if len(guess.loaded) == most:
                    break
                if e in m.slot_of or e in reads or not self.guess_ranks.worth_loading(rank):
                    continue
                row = self.spares.take()
                if row is None:
                    break
                reads[e] = row, self._read(layer, e, row, GUESS)
                guess.loaded.append((e, reads[e][1]))
                self.stats.layer(layer).prefetch_issued += 1
        self.unstarted.clear()

    def bandwidth(self, source: str) -> float:
        """Measured bytes/s into a slot from "disk" or "host" (the performance model's)."""
        return self.mover.bandwidth(source)

    def close(self):
        """Stop the I/O threads (after the reads in flight) and release files and page-locked
        memory. The cache is unusable afterwards."""
        self.mover.close()


def expected_uses(weight: torch.Tensor, bias: torch.Tensor, state: torch.Tensor):
    """A call -> each expert's expected uses in the steps to come (summed over the sequences),
    computed at the first call: only a miss that evicts asks (on CUDA, it reads the device)."""
    scores = None

    def get() -> list[float]:
        nonlocal scores
        if scores is None:
            scores = torch.addmm(bias, state.to(weight.dtype), weight.t()).sum(0).tolist()
        return scores

    return get


class SpareRows:
    """Rows outside every layer's slots, for guesses to be read into. A row given back with
    the load that was writing it is taken again only once that load has stopped."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows: list[tuple[torch.Tensor, Load | None]] = [(row, None) for row in rows]

    def take(self) -> torch.Tensor | None:
        for i, (row, load) in enumerate(self.rows):
            if load is None or load.done():
                del self.rows[i]
                return row
        return None

    def give(self, row: torch.Tensor, load: Load | None = None):
        self.rows.append((row, load))


def slot_rows(n_slots: int, nbytes: int, device: torch.device, memory=None) -> torch.Tensor:
    """A layer's slots, (n_slots, nbytes) uint8. In RAM each starts on an ALIGN boundary, so that
    a converted expert is read into it directly (O_DIRECT wants aligned memory). (An anonymous
    mapping asked for huge pages preloaded no faster.) memory: a preread's rows of this layer."""
    if device.type != "cpu":
        return torch.empty(n_slots, nbytes, dtype=torch.uint8, device=device)
    row = -(-nbytes // ALIGN) * ALIGN
    if memory is not None:
        rows = torch.frombuffer(memory, dtype=torch.uint8, count=n_slots * row)
        return rows.view(n_slots, row)[:, :nbytes]
    buf, start = aligned_buffer(n_slots * row)
    return buf[start : start + n_slots * row].view(n_slots, row)[:, :nbytes]
