"""The expert cache: its slot map as data, its I/O queue's priorities, and the cache itself with
a reader whose reads can be held back, fail or be interrupted."""

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moelocal import store
from moelocal.direct_io import open_uncached, read_fully
from moelocal.errors import MoelocalError
from moelocal.expert_cache import LEND_AFTER, LEND_UNGUESSED, ExpertCache, Guess, slot_rows
from moelocal.experts import ExpertLayout
from moelocal.io_queue import DEMAND, GUESS, GUESS_CHUNK, Dropped, IOQueue, Job, pace
from moelocal.models.common import GLU
from moelocal.models.moe import MoE
from moelocal.movers import CpuMover
from moelocal.prefetch import FIRST_PROBE, PROBE, Payoff, Prefetcher
from moelocal.slot_map import SlotMap, simulate
from moelocal.store import DiskReader, Piece, aligned_buffer, tensor_bytes

D, I, E = 8, 4, 6
LAYOUT = ExpertLayout(D, I, torch.float32)


# ---- the slot map, as data -------------------------------------------------------------------


class Ticket:
    def __init__(self, done=False, ok=True):
        self.is_done, self.is_ok = done, ok

    def done(self):
        return self.is_done

    def ok(self):
        return self.is_done and self.is_ok


def filled(n_slots, policy="lru"):
    m = SlotMap(n_slots, policy)
    for slot in range(n_slots):
        m.place(slot, slot)
    return m


def test_lru_gives_up_the_least_recent_expert():
    m = filled(3)
    for e in (0, 2):
        m.use(e)
    assert m.free_slot() == 1 and set(m.slot_of) == {0, 2}
    m.start(5, 1, Ticket(done=True))
    m.reap()
    m.use(5)
    assert m.free_slot() == 0  # recency now 2, 5


def test_lfu_keeps_the_frequent_expert_and_forgets_an_evicted_one():
    m = filled(2, "lfu")
    for _ in range(3):
        m.use(0)
    m.use(1)
    assert m.free_slot() == 1  # 1 was used once, 0 three times
    m.start(4, 1, Ticket(done=True))
    m.reap()
    for _ in range(4):
        m.use(4)
    assert m.free_slot() == 0
    m.place(1, 0)  # back after its eviction: its old count is gone
    assert m.policy.uses.get(1, 0) == 0


def test_learned_evicts_the_expert_least_expected_and_lru_until_it_has_scores():
    m, lru = filled(4, "learned"), filled(4)
    for e in (2, 0, 3):
        m.use(e)
        lru.use(e)
    m.in_use.add(0)
    lru.in_use.add(0)
    assert m.free_slot() == lru.free_slot() == 1  # no scores: the least recent
    m.place(5, 1)  # slots hold 0 (in use), 5, 2, 3
    calls = []
    scores = [0.9, 0.0, 0.1, 0.5, 9.0, 0.3]
    m.policy.expected = lambda: calls.append(1) or scores
    assert m.free_slot() == 2 and 2 not in m.slot_of  # 0.1 is the lowest not in use
    assert calls
    m.place(4, 2)  # slots hold 0 (in use, 0.9), 5 (0.3), 4 (9.0), 3 (0.5)
    scores[0] = 0.2  # now expected less than any other: its slot is worth waiting for
    assert m.free_slot() is None and 0 in m.slot_of
    m.in_use.discard(0)  # used: free to go
    assert m.free_slot() == 0 and 0 not in m.slot_of
    m.start(1, 0, Ticket())  # the step's miss, loading: waited for too, never a victim
    m.in_use.add(1)
    scores[1] = -1.0
    assert m.free_slot() is None and 1 in m.slot_of
    m.wait_for_reads = False  # small experts: a read is not waited for, a landed one would be
    assert m.free_slot() == 1 and 5 not in m.slot_of
    m.place(5, 1)
    m.wait_for_reads = True
    scores[1] = 1.0
    assert m.free_slot() == 1 and 5 not in m.slot_of


def test_in_use_and_loading_experts_are_never_evicted():
    m = filled(3)
    m.in_use.add(0)
    slot = m.free_slot()
    m.start(7, slot, Ticket())  # in flight
    m.in_use.add(2)
    assert m.free_slot() is None
    assert set(m.slot_of) == {0, 7, 2} and m.loading.keys() == {7}


def test_a_failed_load_unmaps_and_its_slot_drains_until_the_read_ends():
    m = filled(2)
    slot = m.free_slot()
    running = Ticket()
    m.start(5, slot, running)
    m.fail(5)  # e.g. Ctrl-C while waiting: the read goes on
    assert 5 not in m.slot_of and slot in m.draining
    other = m.free_slot()
    assert other != slot and other is not None  # the draining slot is not handed out
    m.place(6, other)
    m.in_use.add(6)
    assert m.free_slot() is None
    running.is_done = True
    m.reap()
    assert m.free_slot() == slot


def test_a_load_that_ended_in_an_error_is_unmapped_when_reaped():
    m = filled(1)
    slot = m.free_slot()
    m.start(3, slot, Ticket(done=True, ok=False))
    m.reap()
    assert 3 not in m.slot_of and m.free_slot() == slot


# ---- the I/O queue ---------------------------------------------------------------------------


def test_demand_goes_before_guesses_and_a_queued_guess_can_be_dropped():
    queue = IOQueue(1)
    gate, order = threading.Event(), []
    first = queue.put(Job(gate.wait), DEMAND)  # holds the only thread
    while first.state != "running":
        time.sleep(0.001)
    guesses = [queue.put(Job(order.append, f"guess{i}"), GUESS) for i in range(3)]
    demand = queue.put(Job(order.append, "demand"), DEMAND)
    assert queue.drop(guesses[1]) and guesses[1].done()
    queue.promote(guesses[2])
    assert not queue.drop(first)  # running: it will finish
    gate.set()
    demand.wait()
    guesses[0].wait()
    queue.close()
    assert order == ["demand", "guess2", "guess0"]


def chunked_guess(chunks: list, n: int, between=None):
    """A guess's read of n chunks: pace() before each, as the disk reader's reads do."""
    for i in range(n):
        pace()
        chunks.append(i)
        if between is not None:
            between(i)


def test_a_running_guess_pauses_for_demand_reads_and_stops_once_dropped():
    queue = IOQueue(4)
    chunks, order, reached = [], [], threading.Event()
    gates = [threading.Event() for _ in range(3)]

    def slowly(i):
        reached.set()
        time.sleep(0.001)

    guess = queue.put(Job(chunked_guess, chunks, 1000, slowly), GUESS)
    assert reached.wait(5)
    # demand reads on the other three threads, then one waiting for a thread: the guess waits
    demands = [queue.put(Job(lambda i=i: gates[i].wait() and order.append(i)), DEMAND)
               for i in range(3)]  # fmt: skip
    while sum(d.state == "running" for d in demands) < 3:
        time.sleep(0.001)
    time.sleep(0.01)  # let a chunk in flight finish
    paused_at = len(chunks)
    time.sleep(0.05)
    assert len(chunks) == paused_at  # no guess chunk beside a demand read
    later = queue.put(Job(order.append, "later"), DEMAND)
    for gate in gates[:2]:
        gate.set()
    later.wait()
    assert len(chunks) == paused_at  # a demand read still runs
    gates[2].set()
    while len(chunks) == paused_at:  # the guess reads on
        time.sleep(0.001)
    assert queue.drop(guess)  # halfway: it stops at its next chunk
    assert guess.finished.wait(5) and isinstance(guess.error, Dropped)
    assert len(chunks) < 1000 and guess.paused_s > 0.05
    queue.close()


def test_guesses_holding_every_thread_read_on_and_a_demand_read_takes_the_first_freed():
    queue = IOQueue(2)
    chunks = [[], []]
    guesses = [queue.put(Job(chunked_guess, chunks[g], 100 * (g + 1), lambda i: time.sleep(0.001)),
                         GUESS) for g in range(2)]  # fmt: skip
    while not all(chunks):
        time.sleep(0.001)
    demand = queue.put(Job(lambda: [len(c) for c in chunks]), DEMAND)
    seen = demand.wait()  # no deadlock: a guess finished, and its thread read the demand
    assert seen[0] == 100 and seen[1] < 200  # the first to finish freed it
    guesses[1].wait()
    assert chunks[1] == list(range(200))
    queue.close()


def test_a_guess_promoted_while_it_runs_reads_beside_demand_reads():
    queue = IOQueue(2)
    chunks, demand_gate = [], threading.Event()
    guess = queue.put(Job(chunked_guess, chunks, 200, lambda i: time.sleep(0.001)), GUESS)
    while not chunks:
        time.sleep(0.001)
    demand = queue.put(Job(demand_gate.wait), DEMAND)
    queue.promote(guess)
    guess.wait()  # finished while the demand read still runs
    assert chunks == list(range(200)) and not demand.done()
    assert not queue.drop(guess)  # landed: nothing to stop
    demand_gate.set()
    queue.close()


def test_a_guess_reads_a_file_in_chunks_a_demand_read_whole_and_a_dropped_guess_stops(tmp_path):
    data = os.urandom(5 * GUESS_CHUNK + 4096)
    (tmp_path / "experts.bin").write_bytes(data)
    fd, direct = open_uncached(tmp_path / "experts.bin")
    queue = IOQueue(1)

    def read(calls: list, drop_after=None):
        buf, start = aligned_buffer(len(data))
        view = tensor_bytes(buf[start:], len(data))

        def counted():
            calls.append(1)
            if len(calls) == drop_after:
                queue.drop(job)
            return pace()

        assert read_fully(fd, direct, view, 0, len(data), counted)
        return bytes(view)

    for priority, reads in ((DEMAND, 1), (GUESS, 6)):
        calls = []
        job = queue.put(Job(read, calls), priority)
        assert job.wait() == data and len(calls) == reads
    calls = []
    job = queue.put(Job(read, calls, 3), GUESS)
    assert job.finished.wait(10) and isinstance(job.error, Dropped) and len(calls) == 3
    queue.close()
    os.close(fd)


def test_guesses_paused_by_demand_reads_land_intact(tmp_path, monkeypatch):
    """Unconverted experts are read piece by piece through a thread's staging buffer: a guess
    paused halfway through a piece while demand reads run must still land its own bytes."""
    d, i, n = 512, 1024, 4  # 2 MiB a piece: a guess reads each in more than one chunk
    layout = ExpertLayout(d, i, torch.float32)
    weights = torch.randn(n, 3, i, d, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "experts.bin"
    path.write_bytes(b"x" * 100 + weights.numpy().tobytes())  # offsets off the block size
    pieces, offset = {}, 100
    for e in range(n):
        pieces[0, e] = []
        for part, shape in (("gate", (i, d)), ("up", (i, d)), ("down", (d, i))):
            nbytes = 4 * i * d
            pieces[0, e].append(Piece(part, path, offset, nbytes, torch.float32, shape))
            offset += nbytes
    reader = DiskReader(pieces, layout)
    queue = IOQueue(2)
    mid_read, demands_queued = threading.Event(), threading.Event()
    calls = {}

    def held_pace():  # holds the guess halfway through its first piece until demands wait
        calls[threading.get_ident()] = calls.get(threading.get_ident(), 0) + 1
        if calls[threading.get_ident()] == 2 and not mid_read.is_set():
            mid_read.set()
            assert demands_queued.wait(10)
        return real_pace()

    real_pace = store.pace
    monkeypatch.setattr(store, "pace", held_pace)
    blobs = [torch.empty(layout.nbytes, dtype=torch.uint8) for _ in range(n)]
    guess = queue.put(Job(reader.read, 0, 0, blobs[0]), GUESS)
    assert mid_read.wait(10)
    demands = [queue.put(Job(reader.read, 0, e, blobs[e]), DEMAND) for e in range(1, n)]
    demands_queued.set()
    for job in [guess, *demands]:
        job.wait()
    assert guess.paused_s > 0
    for e in range(n):
        views = layout.views(blobs[e])
        gate, up, down = weights[e, 0], weights[e, 1], weights[e, 2].reshape(d, i)
        assert torch.equal(views["gate_up"]["w"], torch.cat([gate, up]))
        assert torch.equal(views["down"]["w"], down)
    queue.close()
    reader.close()


def test_a_job_error_reaches_the_waiter_and_close_drops_what_is_queued():
    queue = IOQueue(1)
    gate = threading.Event()
    queue.put(Job(gate.wait))
    failing = queue.put(Job(lambda: 1 / 0))
    queued = queue.put(Job(lambda: None))
    gate.set()
    with pytest.raises(ZeroDivisionError):
        failing.wait()
    queue.close()
    assert queued.done() and all(not t.is_alive() for t in queue.threads)


# ---- the cache -------------------------------------------------------------------------------


class FakeReader:
    """Expert e of layer l is random weights seeded by (l, e). A read waits for its gate, if it
    has one, and raises the error set for it, once."""

    def __init__(self, layout=LAYOUT, layers=(0,)):
        self.layout = layout
        self.pieces = {(layer, e): None for layer in layers for e in range(E)}
        self.reads, self.gates, self.errors = [], {}, {}
        self.delay = 0.0  # seconds each read takes
        self.waiting = {}  # (layer, e) -> set once its read waits at its gate

    def weights(self, layer, e):
        gen = torch.Generator().manual_seed(100 * layer + e)
        return torch.randn(2 * I, D, generator=gen), torch.randn(D, I, generator=gen)

    def read(self, layer, e, dest):
        gate = self.gates.get((layer, e))
        if gate is not None:
            self.waiting.setdefault((layer, e), threading.Event()).set()
            assert gate.wait(10)
        time.sleep(self.delay)
        pace()  # as the disk reader's reads do: a guess dropped by now stops here
        self.reads.append((layer, e))
        if (layer, e) in self.errors:
            raise self.errors.pop((layer, e))
        return self.layout.fill(dest, *self.weights(layer, e))

    def close(self):
        pass


def make_cache(n_slots, policy="lru", layout=LAYOUT, threads=2, layers=(0,), guess_rows=3,
               delay=0.0):  # fmt: skip
    """delay: the seconds each read takes, the preload's included (its reads are the first
    measure of a miss's)."""
    reader = FakeReader(layout, layers)
    reader.delay = delay
    mover = CpuMover(reader, IOQueue(threads))
    cache = ExpertCache(layout, mover, list(layers), E, n_slots, policy, guess_rows=guess_rows)
    return cache, reader


def step(cache, experts, n_tokens=1, layer=0):
    """One layer call in which every token picks `experts`, through the MoE block's dispatch."""
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([experts] * n_tokens)
    weights = torch.full(ids.shape, 1.0 / len(experts))
    block = SimpleNamespace(experts=cache, layer=layer, glu=GLU(F.silu))
    return MoE.routed_experts(block, x, ids, weights, x[-1:]), x, ids, weights


def guess(cache, layer, ranked, cost_s=0.0):
    """The prefetcher's guess of a layer whose guesses pay, its loads started at once (as the
    running layer would)."""
    cache.prefetch(layer, ranked, cost_s)
    cache.payoffs[layer].recorded = True  # past probing: every guess worth loading is loaded
    cache.start_guesses()


def expected(reader, x, experts, weights):
    out = torch.zeros_like(x)
    for k, e in enumerate(experts):
        gate_up, down = reader.weights(0, e)
        gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
        out += ((F.silu(gate) * up) @ down.t()) * weights[:, k, None]
    return out


def cached(cache, layer=0):
    return set(cache.maps[layer].slot_of)


def test_preload_fills_slots_then_lru_evicts_least_recent():
    cache, _ = make_cache(3)
    assert cached(cache) == {0, 1, 2}
    step(cache, [0, 1])  # 2 is now least recent
    step(cache, [3, 0])
    assert cached(cache) == {0, 1, 3}
    step(cache, [4, 5])  # recency is now 1, 0, 3: 1 and 0 go
    assert cached(cache) == {3, 4, 5}
    s = cache.stats.total()
    assert (s.uses, s.hits, s.misses) == (6, 3, 3)
    cache.close()


def test_one_slot_serves_a_top_two_layer():
    cache, reader = make_cache(1)
    out, x, ids, weights = step(cache, [4, 2], n_tokens=3)
    assert torch.allclose(out, expected(reader, x, [4, 2], weights), atol=1e-6)
    assert cache.stats.total().misses == 2
    cache.close()


def reuse_map(seed: int = 0) -> dict:
    """Layer 0's eviction scores: a random map from the state a layer call is given."""
    gen = torch.Generator().manual_seed(seed)
    return {0: (torch.randn(E, D, generator=gen), torch.randn(E, generator=gen))}


@pytest.mark.parametrize("policy", ["lru", "lfu", "learned"])
def test_outputs_do_not_depend_on_the_number_of_slots(policy):
    outs = []
    for n_slots in (1, 2, 3, E):
        cache, _ = make_cache(n_slots, policy)
        cache.evict_by(reuse_map())
        sequence = ([5, 1], [1, 3], [0, 5], [2, 4], [4, 0])
        outs.append([step(cache, experts, n_tokens=2)[0] for experts in sequence])
        cache.close()
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["lru", "learned"])
@pytest.mark.parametrize("n_slots", [1, 2, 4])
@pytest.mark.parametrize("big_experts", [False, True])  # a miss may wait for a read, or not
def test_the_simulated_slot_map_hits_as_the_cache_does(policy, n_slots, big_experts, monkeypatch):
    """slot_map.simulate, by which calibrate judges a fit, counts the cache's own hits."""
    if big_experts:
        monkeypatch.setattr("moelocal.slot_map.READ_BOUND_BYTES", LAYOUT.nbytes)
    rng = torch.Generator().manual_seed(n_slots)
    cache, _ = make_cache(n_slots, policy, guess_rows=0)
    weight, bias = reuse_map(n_slots)[0]
    cache.evict_by({0: (weight, bias)})
    steps, scores, hot = [], [], [1, 4]
    for _ in range(60):
        pool = hot if torch.rand(1, generator=rng) < 0.5 else list(range(E))
        picks = torch.randperm(len(pool), generator=rng)[:2].tolist()
        experts = sorted(pool[i] for i in picks)
        _, x, _, _ = step(cache, experts, n_tokens=int(torch.randint(1, 3, (1,), generator=rng)))
        steps.append(set(experts))
        scores.append(torch.addmm(bias, x[-1:], weight.t()).sum(0).tolist())
    preload = [set(range(n_slots))]  # the cache starts with expert s in slot s (no hit)
    assert cache.maps[0].wait_for_reads == big_experts
    hits = simulate(preload + steps, n_slots, policy, [[0.0] * E] + scores, big_experts)
    assert cache.stats.total().hits == hits
    cache.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_sums_like_the_general_path(dtype):
    """Decode's single token skips the gathers and scatters of the general path (index_add_ of
    each expert's weighted output, in expert order): the bits are the same."""
    layout = ExpertLayout(D, I, dtype)
    cache, reader = make_cache(E, layout=layout)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids, weights = torch.tensor([[4, 1]]), torch.tensor([[0.7, 0.3]])
    want = torch.zeros_like(x)
    for e, k in ((1, 1), (4, 0)):
        blob = layout.fill(torch.empty(layout.nbytes, dtype=torch.uint8), *reader.weights(0, e))
        y = layout.forward(x, layout.views(blob), GLU(F.silu)) * weights[:, k, None]
        want.index_add_(0, torch.tensor([0]), y.to(dtype))
    block = SimpleNamespace(experts=cache, layer=0, glu=GLU(F.silu))
    out = MoE.routed_experts(block, x, ids, weights)
    assert out.dtype == dtype and torch.equal(out, want)
    cache.close()


def guess_load(cache, layer, e):
    """The load of a guess of expert e of layer, reading into its spare row."""
    return cache.guess_reads[layer][e][1]


def all_rows(cache) -> list[int]:
    """Where every slot's, spare and guess's row starts."""
    rows = [r for slots in cache.slots.values() for r in slots] + [r for r, _ in cache.spares.rows]
    rows += [r for reads in cache.guess_reads.values() for r, _ in reads.values()]
    return sorted(r.data_ptr() for r in rows)


def test_a_guess_is_read_into_a_spare_row_and_a_wrong_one_evicts_nothing():
    cache, reader = make_cache(2, guess_rows=2)  # holds 0, 1
    reader.gates[0, 4] = reader.gates[0, 5] = gate = threading.Event()
    guess(cache, 0, [4, 5, 6])  # two spare rows: 4 and 5 are read, 6 is not
    assert set(cache.guess_reads[0]) == {4, 5} and cached(cache) == {0, 1}
    assert cache.stats.total().prefetch_issued == 2
    gate.set()
    out, x, _, weights = step(cache, [0, 1])  # neither guess needed: both dropped
    assert cached(cache) == {0, 1} and not cache.guess_reads
    s = cache.stats.total()
    assert (s.hits, s.misses, s.prefetch_used) == (2, 0, 0)
    assert torch.equal(out, expected(reader, x, [0, 1], weights))
    cache.close()


def run_judged(cache, calls: int, guessed_every: int, cycle: int = 4, lead_s: float = 0.0):
    """Layer calls the switch decides (the layer has been guessed before), every
    `guessed_every`-th one with a guess of its expert made `lead_s` before it (none: 0),
    cycling through experts 0..cycle-1."""
    for t in range(calls):
        if guessed_every and t % guessed_every == 0:
            guess(cache, 0, [t % cycle])
            time.sleep(lead_s)
        else:
            cache.payoffs.setdefault(0, Payoff())
        step(cache, [t % cycle])


def test_spare_rows_become_slots_where_guessing_was_left_off_in_most_layer_calls():
    cache, reader = make_cache(2, guess_rows=2)
    run_judged(cache, LEND_AFTER - 1, guessed_every=8)
    assert cache.n_slots == {0: 2} and len(cache.spares.rows) == 2
    run_judged(cache, 1, guessed_every=0)  # the LEND_AFTER-th: most were left unguessed
    assert cache.n_slots == {0: 4} and not cache.spares.rows
    reads = len(reader.reads)
    for e in (0, 1, 2, 3, 0, 1, 2, 3):  # four slots now hold them all
        out, x, _, weights = step(cache, [e])
        assert torch.equal(out, expected(reader, x, [e], weights))
    assert len(reader.reads) <= reads + 4 and cached(cache) == {0, 1, 2, 3}
    guess(cache, 0, [5])  # no row left to read a guess into
    assert not cache.guess_reads.get(0)
    cache.close()


EVERY = max(2, int(1 / (1 - LEND_UNGUESSED)) - 1)  # guessed more often than LEND_UNGUESSED


def test_spare_rows_stay_where_guesses_saved_more_than_a_slot_more_would_have():
    # 4 experts in turn through 2 slots: one slot more would hit none of them; the guesses,
    # right and landed before their layer ran, saved their reads
    cache, _ = make_cache(2, guess_rows=2, delay=0.002)
    run_judged(cache, 2 * LEND_AFTER, guessed_every=EVERY, lead_s=0.006)
    assert cache.guesses_saved > 0 and cache.slot_more_hits == {0: 0}
    assert cache.n_slots == {0: 2} and len(cache.spares.rows) == 2
    cache.close()


def test_spare_rows_become_slots_where_a_slot_more_would_have_saved_more_than_guesses():
    # 3 experts in turn through 2 slots: every miss is of the expert evicted last, which a
    # third slot would have held; the guesses (made as their layers start) saved next to nothing
    cache, reader = make_cache(2, guess_rows=2, delay=0.002)
    run_judged(cache, LEND_AFTER, guessed_every=EVERY, cycle=3)
    assert cache.slot_more_hits[0] > LEND_AFTER / 2 and cache.n_slots[0] > 2
    step(cache, [0])  # the row the last guess was read into is lent once it is spare again
    assert cache.n_slots == {0: 4} and not cache.spares.rows
    step(cache, [1]), step(cache, [2])
    reads = len(reader.reads)
    for e in (0, 1, 2, 0, 1, 2):
        out, x, _, weights = step(cache, [e])
        assert torch.equal(out, expected(reader, x, [e], weights))
    assert len(reader.reads) == reads  # all three cached now
    cache.close()


def test_a_second_guess_of_a_layer_replaces_the_first_whose_other_reads_stop():
    """Layer 0 is guessed for the next token (read off the head), then from its embedding: the
    second guess replaces the first, the first's reads of experts it names go on, the others
    stop and give their rows to the second's, and the two cost the layer one guess."""
    cache, reader = make_cache(2, guess_rows=2)  # holds 0, 1
    reader.gates[0, 4] = gate = threading.Event()
    guess(cache, 0, [4, 5, 6], 0.001)  # two spare rows: 4 and 5 are read, 6 is not
    five = cache.guess_reads[0][5][1]
    while not five.done():
        time.sleep(0.001)
    guess(cache, 0, [7, 4, 1], 0.002)  # 5 is not named: its row goes to 7
    merged = cache.guesses[0]
    assert merged.ranked == [7, 4, 1] and merged.cost_s >= 0.003
    assert [e for e, _ in merged.loaded] == [4, 7] and set(cache.guess_reads[0]) == {4, 7}
    gate.set()
    out, x, _, weights = step(cache, [4, 7])
    s = cache.stats.total()
    assert (s.prefetch_used, s.misses, s.prefetch_issued) == (2, 0, 3)
    assert torch.equal(out, expected(reader, x, [4, 7], weights))
    cache.close()


def test_without_spare_rows_nothing_is_guessed_into_memory():
    cache, reader = make_cache(2, guess_rows=0)
    guess(cache, 0, [4])
    assert not cache.guess_reads.get(0) and cache.stats.total().prefetch_issued == 0
    step(cache, [4])
    assert reader.reads.count((0, 4)) == 1 and cache.stats.total().misses == 1
    cache.close()


def test_a_needed_guess_trades_its_row_for_the_slot_a_miss_would_take():
    cache, reader = make_cache(2, guess_rows=1)
    rows = all_rows(cache)
    step(cache, [1])  # 0 is now least recent
    guess(cache, 0, [4])
    guess_load(cache, 0, 4).job.finished.wait(10)
    spare = cache.guess_reads[0][4][0].data_ptr()
    out, x, _, weights = step(cache, [4, 1])
    m = cache.maps[0]
    assert cached(cache) == {1, 4} and cache.slots[0][m.slot_of[4]].data_ptr() == spare
    assert all_rows(cache) == rows  # 0's row is the spare now
    s = cache.stats.total()
    assert (s.hits, s.misses, s.prefetch_used) == (2, 0, 1) and reader.reads.count((0, 4)) == 1
    assert torch.equal(out, expected(reader, x, [4, 1], weights))
    out, x, _, weights = step(cache, [4, 0])  # 4 from its new slot; 0 read into the spare's
    assert torch.equal(out, expected(reader, x, [4, 0], weights))
    cache.close()


def test_prediction_recall_counts_guessed_experts():
    cache, _ = make_cache(2)
    guess(cache, 0, [3, 4])
    step(cache, [3, 5])
    s = cache.stats.total()
    assert (s.predicted_needed, s.needed_with_guess) == (1, 2)
    cache.close()


def test_a_guess_not_needed_is_dropped_and_its_row_waits_for_its_read_to_stop():
    cache, reader = make_cache(3, threads=1, guess_rows=2)
    reader.gates[0, 3] = gate = threading.Event()
    guess(cache, 0, [3, 4])  # 3 is read (held at its gate), 4 waits in the queue
    while guess_load(cache, 0, 3).job.state != "running":
        time.sleep(0.001)
    row3 = cache.guess_reads[0][3][0].data_ptr()
    out, x, _, weights = step(cache, [2])
    assert not cache.guess_reads and cached(cache) == {0, 1, 2}  # both dropped, nothing evicted
    busy = [r.data_ptr() for r, load in cache.spares.rows if not (load is None or load.done())]
    assert busy == [row3]  # not taken again while 3's read may still write it
    assert cache.spares.take().data_ptr() != row3
    gate.set()
    out3, x3, _, weights3 = step(cache, [3])  # a miss: read into a slot
    assert reader.reads.count((0, 4)) == 0 and reader.reads.count((0, 3)) == 1
    s = cache.stats.total()
    assert (s.prefetch_used, s.misses) == (0, 1)
    assert torch.equal(out, expected(reader, x, [2], weights))
    assert torch.equal(out3, expected(reader, x3, [3], weights3))
    cache.close()


def test_a_layers_misses_are_read_before_the_next_layers_guesses():
    cache, reader = make_cache(2, threads=1, layers=(0, 1))
    reader.gates[1, 3] = gate = threading.Event()
    guess(cache, 1, [3, 4])  # 3 holds the only I/O thread, 4 waits
    while guess_load(cache, 1, 3).job.state != "running":
        time.sleep(0.001)

    def release_once_the_miss_is_queued():
        while (load := cache.maps[0].loading.get(5)) is None or load.job.state == "new":
            time.sleep(0.001)
        gate.set()

    threading.Thread(target=release_once_the_miss_is_queued).start()
    step(cache, [5], layer=0)  # a miss, asked after the guesses
    cache.close()
    # one thread: the guess holding it reads on (the miss has no thread to go to)
    after = reader.reads[reader.reads.index((1, 3)) :]
    assert after in ([(1, 3), (0, 5), (1, 4)], [(1, 3), (0, 5)])  # 4: read next, or dropped


def test_a_guess_made_during_a_layers_attention_is_read_after_that_layers_misses():
    cache, reader = make_cache(2, threads=1, layers=(0, 1))
    cache.prefetch(1, [3])  # layer 0's attention guessed layer 1
    assert not cache.guess_reads.get(1)  # nothing started yet
    step(cache, [5], layer=0)  # layer 0 asks for its miss, then the guess starts
    guess_load(cache, 1, 3).job.finished.wait(10)
    assert reader.reads[-2:] == [(0, 5), (1, 3)]
    step(cache, [3], layer=1)
    assert cache.stats.layer(1).prefetch_used == 1
    cache.close()


def test_waiting_for_a_needed_guess_still_reading_counts_as_stall():
    cache, reader = make_cache(1, threads=2)
    reader.gates[0, 3] = gate = threading.Event()
    guess(cache, 0, [3])
    while guess_load(cache, 0, 3).job.state != "running":
        time.sleep(0.001)
    threading.Timer(0.3, gate.set).start()
    out, x, _, weights = step(cache, [3])
    s = cache.stats.total()
    assert s.stall_s >= 0.1 and s.prefetch_used == 1 and reader.reads.count((0, 3)) == 1
    assert torch.equal(out, expected(reader, x, [3], weights))
    cache.close()


def test_a_failed_read_unmaps_the_expert_and_a_later_call_reads_it_again():
    cache, reader = make_cache(2)
    reader.errors[0, 4] = MoelocalError("experts.bin: expert 4 of layer 0 fails its checksum")
    with pytest.raises(MoelocalError, match="checksum"):
        step(cache, [4])
    m = cache.maps[0]
    assert 4 not in m.slot_of and not m.loading and not m.in_use
    out, x, _, weights = step(cache, [4, 0])
    assert torch.equal(out, expected(reader, x, [4, 0], weights))
    assert reader.reads.count((0, 4)) == 2
    cache.close()


def test_ctrl_c_while_waiting_leaves_no_half_read_expert_behind():
    """SIGINT while the layer waits for a miss: the expert is unmapped, its slot stays out of
    use until the read behind it ends, and later calls compute what they should."""
    cache, reader = make_cache(2)
    reader.gates[0, 4] = gate = threading.Event()
    main = threading.get_ident()
    reader.waiting[0, 4] = started = threading.Event()
    waits, wait_landed = threading.Event(), cache._wait_landed

    def waiting_for_it(layer, e):  # the main thread is about to block on the read
        waits.set()
        return wait_landed(layer, e)

    cache._wait_landed = waiting_for_it

    def ctrl_c_once_the_read_runs():
        started.wait(10)
        waits.wait(10)  # (a fixed sleep raced a slow main thread once)
        time.sleep(0.05)  # from the call into the blocking wait: a few bytecodes
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=ctrl_c_once_the_read_runs).start()
    with pytest.raises(KeyboardInterrupt):
        step(cache, [4])
    m = cache.maps[0]
    assert 4 not in m.slot_of and len(m.draining) == 1 and not m.in_use
    draining = next(iter(m.draining))
    out, x, _, weights = step(cache, [5])  # must not load into the slot still being written
    assert m.slot_of[5] != draining
    assert torch.equal(out, expected(reader, x, [5], weights))
    gate.set()
    out, x, _, weights = step(cache, [4, 5])
    assert torch.equal(out, expected(reader, x, [4, 5], weights))
    cache.close()  # after the reads in flight: the interrupted one may still be finishing
    assert reader.reads.count((0, 4)) == 2


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_stats_are_consistent(policy):
    cache, reader = make_cache(2, policy=policy)
    rows = all_rows(cache)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        experts = torch.randperm(E, generator=gen)[:2].tolist()
        if torch.rand(1, generator=gen) < 0.5:
            guess(cache, 0, torch.randperm(E, generator=gen)[:3].tolist())
        out, x, _, weights = step(cache, experts)
        assert torch.equal(out, expected(reader, x, experts, weights))
        assert all_rows(cache) == rows  # rows trade places, none is lost or shared
    s = cache.stats.total()
    d = cache.stats.as_dict(cache.expert_bytes)
    assert s.hits + s.prefetch_used + s.misses == s.uses == 60
    assert 0 <= d["prefetch_precision"] <= 1 and 0 <= d["prefetch_recall"] <= 1
    # the share of what the cache lacked that guesses read ahead
    assert s.prefetch_used and s.misses
    assert d["prefetch_coverage"] == round(s.prefetch_used / (s.prefetch_used + s.misses), 4)
    assert d["demand_bytes"] == s.misses * cache.expert_bytes
    assert d["bytes_moved"] == d["bytes_from_disk"] == d["demand_bytes"] + d["prefetch_bytes"]
    cache.close()


# ---- whether guessing pays -------------------------------------------------------------------


def test_a_layer_whose_guesses_cost_is_probed_ever_less_often_up_to_every_probe_th_run():
    payoff, guessed = Payoff(), []
    for run in range(4 * PROBE + 120):
        if payoff.due:  # never guessed: guessed
            guessed.append(run)
            payoff.record(-1e-4)  # the routing cost, nothing saved
        payoff.ran(guessed=payoff.due)
    gaps = [b - a for a, b in zip(guessed, guessed[1:], strict=False)]
    assert guessed[0] == 0 and gaps[0] == FIRST_PROBE
    assert gaps == [min(FIRST_PROBE * 2**n, PROBE) for n in range(len(gaps))]
    assert gaps[-3:] == [PROBE] * 3


def test_a_guess_that_saved_time_keeps_its_layer_guessed_through_a_few_that_did_not():
    payoff = Payoff()
    payoff.record(-1e-3)
    payoff.ran(guessed=True)
    assert not payoff.due
    payoff.record(5e-3)  # a probe that hid a load
    payoff.ran(guessed=True)
    assert payoff.due
    for _ in range(3):
        payoff.record(-1e-4)
        payoff.ran(guessed=True)
        assert payoff.due


def test_a_guess_that_found_its_experts_cached_and_lost_its_routing_waits_like_any_loss():
    payoff = Payoff()
    payoff.record(-5e-5)  # routing only: every guessed expert was cached
    payoff.ran(guessed=True)
    runs = 0
    while not payoff.due:
        payoff.ran(guessed=False)
        runs += 1
    assert runs == FIRST_PROBE - 1


def test_needed_guesses_share_the_wait_of_the_misses_their_layer_lacked():
    class Landed:
        def __init__(self, head_s):
            self.head_s = head_s

        def head_start(self, now, whole):
            return self.head_s

    wall, cpu, cost = 0.01, 0.001, 0.0005  # a miss's read, a load's CPU time, the routing
    cache = SimpleNamespace(mover=SimpleNamespace(load_seconds=lambda: (wall, cpu)))
    loads = [(3, Landed(0.03)), (4, Landed(0.004)), (5, Landed(0.02))]
    g = Guess([3, 4, 5], [(0, 3), (1, 4), (2, 5)], loads, cost)
    # 3 ran longer than a miss's read (beside compute) and spares one read at most; 5 was wrong;
    # the layer lacked 2 experts, whose reads would have run together: each spares half
    saved = ExpertCache._saved(cache, g, {3, 4}, lacked=2)
    assert saved == pytest.approx(-cost + (wall / 2 - cpu) + (0.004 / 2 - cpu) - cpu)
    alone = ExpertCache._saved(cache, g, {3, 4}, lacked=1)
    assert alone > saved  # a layer lacking only its guessed expert waited for it alone


def test_a_misss_read_time_is_not_stretched_by_guesses_read_beside_compute():
    queue = IOQueue(1)
    queue.put(Job(time.sleep, 0.03), GUESS).wait()
    assert queue.job_s >= 0.03  # before any miss, a guess's is all there is
    queue.put(Job(time.sleep, 0.002)).wait()
    demand_s = queue.job_s
    assert demand_s < 0.01
    queue.put(Job(time.sleep, 0.03), GUESS).wait()
    assert queue.job_s == demand_s and queue.job_cpu_s > 0  # its CPU time still counts
    queue.close()


def spin(seconds: float):
    """CPU time, as a read faulting in fresh memory takes it."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_first_touchs_cpu_time_is_not_what_a_load_costs():
    queue = IOQueue(1)
    first = Job(spin, 0.03)
    first.first_touch = True  # its memory was never written: page faults, once
    queue.put(first).wait()
    assert queue.job_cpu_s == 0 and queue.job_s >= 0.03  # no load's CPU time known yet
    queue.put(Job(spin, 0.002)).wait()
    assert 0 < queue.job_cpu_s < 0.01 and queue.job_s < 0.01  # a read into used memory's
    again = Job(spin, 0.03)
    again.first_touch = True
    queue.put(again).wait()
    assert queue.job_cpu_s < 0.01 and queue.job_s < 0.01
    queue.close()


def test_the_cpu_mover_marks_a_load_into_unwritten_memory_as_a_first_touch():
    reader = FakeReader()
    mover = CpuMover(reader, IOQueue(1))
    rows = slot_rows(2, LAYOUT.nbytes, torch.device("cpu"))
    marks = [mover.load(0, e, rows[r]).job.first_touch for e, r in ((0, 0), (1, 1), (2, 0))]
    assert marks == [True, True, False]
    mover.close()


def test_a_costly_wrong_guess_is_forgiven_by_the_next_probe_that_pays():
    payoff = Payoff()

    def unguessed_runs() -> int:
        runs = 0
        while not payoff.due:
            payoff.ran(guessed=False)
            runs += 1
        return runs

    payoff.record(-20e-3)  # wrong guesses whose reads took the CPU
    payoff.ran(guessed=True)
    assert unguessed_runs() == FIRST_PROBE - 1  # guessed again at the probe, not before
    payoff.record(-1e-3)  # the probe lost too: the next waits twice as long
    payoff.ran(guessed=True)
    assert unguessed_runs() == 2 * FIRST_PROBE - 1
    payoff.record(30e-3)  # this probe hid a read
    payoff.ran(guessed=True)
    assert payoff.due
    payoff.record(-60e-3)  # a loss after a gain starts again from the shortest wait
    payoff.ran(guessed=True)
    assert unguessed_runs() == FIRST_PROBE - 1


def guessed_then_run(needed: list[int], delay: float, cost_s: float = 1e-3):
    """A cache whose reads take `delay` s: layer 0 guessed [3] (its routing taking cost_s, here
    slow), the guess landed, then the layer runs needing `needed`."""
    cache, reader = make_cache(2, delay=delay)
    guess(cache, 0, [3], cost_s=cost_s)
    guess_load(cache, 0, 3).job.finished.wait(10)
    step(cache, needed)
    return cache


def test_a_guess_its_layer_needed_pays_for_itself_and_a_wrong_one_does_not():
    cache = guessed_then_run([3], delay=0.02)
    assert cache.payoffs[0].gain > 0.01 and cache.due(0)
    cache.close()
    cache = guessed_then_run([4], delay=0.02)  # its routing's cost, nothing saved
    assert cache.payoffs[0].gain < 0 and not cache.due(0)
    step(cache, [0])  # a run without a guess is counted as skipped
    assert cache.stats.total().guesses_skipped == 1
    cache.close()


def test_a_load_quicker_than_the_guess_does_not_pay():
    # routing far slower than a read with no delay (which a busy 2-core machine once stretched
    # to 1.6 ms, more than a 1 ms routing)
    cache = guessed_then_run([3], delay=0.0, cost_s=0.05)
    assert cache.payoffs[0].gain < 0 and not cache.due(0)
    cache.close()


@pytest.mark.parametrize(
    "moe, depth, targets",
    [
        # layer 0 from the embedding, and the next token's from the last layer, depth - 1 back
        ([0, 1, 2, 3], 1, {-1: [0], 0: [1], 1: [2], 2: [3], 3: [0]}),
        ([0, 1, 2, 3], 2, {-1: [0], 0: [1, 2], 1: [3], 2: [0]}),
        ([0, 2, 3], 1, {-1: [0], 0: [], 1: [2], 2: [3], 3: [0]}),  # 1 dense: nothing from 0
        # never from layer 0's own attention: this token's layer 0 has not run yet
        ([0, 1, 2, 3], 4, {-1: [0], 0: [1, 2, 3], 1: [0], 2: []}),
        ([0, 1], 2, {-1: [0], 0: [1], 1: [0]}),
        ([0], 2, {-1: [0]}),
        ([1, 2], 3, {0: [1, 2], 1: []}),  # layer 0 dense: the layers before it guess it
    ],
)
def test_each_moe_layer_is_guessed_once_a_step_depth_layers_ahead(moe, depth, targets):
    cache = SimpleNamespace(slots=dict.fromkeys(moe))
    assert Prefetcher(cache, depth=depth).targets == targets


def test_a_guess_made_at_a_dense_layer_starts_at_once():
    cache, reader = make_cache(2, layers=(1,))
    layer = SimpleNamespace(route=lambda h, extra, gate: (torch.tensor([[3, 4]]), None))
    Prefetcher(cache)([None, layer], 0, torch.zeros(1, 1, D))  # layer 0 is dense
    assert 3 in cache.guess_reads[1]
    cache.close()


def test_a_layer_not_known_to_pay_loads_only_its_best_guess():
    cache, reader = make_cache(3, delay=0.02)  # 0, 1, 2 cached
    cache.prefetch(0, [3, 4, 5])
    cache.start_guesses()  # never guessed before: a probe
    assert [e for e, _ in cache.guesses[0].loaded] == [3]
    guess_load(cache, 0, 3).job.finished.wait(10)
    step(cache, [3, 4])  # it paid: 3's read was done
    assert not cache.payoffs[0].probing
    cache.prefetch(0, [5, 6, 7])
    cache.start_guesses()
    assert [e for e, _ in cache.guesses[0].loaded] == [5, 6]  # rank 3: never needed yet
    cache.close()
