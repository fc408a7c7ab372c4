"""The expert cache as data: access sequences in, evictions and hit counts out."""

from concurrent.futures import Future

import pytest
import torch

from moelocal.expert_cache import ExpertCache
from moelocal.experts import ExpertLayout

D, I, E = 8, 4, 6
LAYOUT = ExpertLayout(D, I, torch.float32)


class FakeReader:
    """Expert e of layer l is random weights seeded by (l, e); loads finish when told to."""

    def __init__(self, instant=True, layout=LAYOUT):
        self.instant, self.pending, self.reads, self.layout = instant, [], [], layout
        self.local = type("Local", (), {})()

    def weights(self, layer, e):
        gen = torch.Generator().manual_seed(100 * layer + e)
        return torch.randn(2 * I, D, generator=gen), torch.randn(D, I, generator=gen)

    def read(self, layer, e, dest):
        self.reads.append((layer, e))
        return self.layout.fill(dest, *self.weights(layer, e))

    def submit(self, fn, *args):
        future = Future()
        if self.instant:
            future.set_result(fn(*args))
        else:
            self.pending.append((future, fn, args))
        return future

    def complete_all(self):
        for future, fn, args in self.pending:
            future.set_result(fn(*args))
        self.pending = []

    def close(self):
        pass


def make_cache(n_slots, policy="lru", reader=None, layout=LAYOUT):
    reader = reader or FakeReader(layout=layout)
    cache = ExpertCache(layout, torch.nn.functional.silu, reader, [0], E, n_slots,
                        torch.device("cpu"), policy=policy)  # fmt: skip
    return cache, reader


def step(cache, experts, n_tokens=1):
    """One layer call in which every token picks `experts`."""
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([experts] * n_tokens)
    weights = torch.full(ids.shape, 1.0 / len(experts))
    return cache(0, x, ids, weights), x, ids, weights


def cached(cache):
    return set(cache.layers[0].slot_of)


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


def test_lfu_keeps_the_frequent_expert():
    cache, _ = make_cache(2, policy="lfu")
    for _ in range(3):
        step(cache, [0])
    step(cache, [1])
    step(cache, [2])  # LFU evicts 1 (used once), LRU would have evicted 0
    assert cached(cache) == {0, 2}
    lru, _ = make_cache(2, policy="lru")
    for experts in ([0], [0], [0], [1], [2]):
        step(lru, experts)
    assert cached(lru) == {1, 2}


def test_one_slot_serves_a_top_two_layer():
    cache, reader = make_cache(1)
    out, x, ids, weights = step(cache, [4, 2], n_tokens=3)
    expected = torch.zeros_like(x)
    for k, e in enumerate([4, 2]):
        gate_up, down = reader.weights(0, e)
        gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down.t()
        expected += y * weights[:, k, None]
    assert torch.allclose(out, expected, atol=1e-6)
    assert cache.stats.total().misses == 2


def test_outputs_do_not_depend_on_the_number_of_slots():
    outs = []
    for n_slots in (1, 2, E):
        cache, _ = make_cache(n_slots)
        outs.append([step(cache, experts, n_tokens=2)[0] for experts in ([5, 1], [1, 3], [0, 5])])
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_sums_like_the_general_path(dtype):
    """Decode's single token skips the gathers and scatters of the general path (index_add_ of
    each expert's weighted output, in expert order): the bits are the same."""
    layout = ExpertLayout(D, I, dtype)
    cache, reader = make_cache(E, layout=layout)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids, weights = torch.tensor([[4, 1]]), torch.tensor([[0.7, 0.3]])
    expected = torch.zeros_like(x)
    for e, k in ((1, 1), (4, 0)):
        blob = layout.fill(torch.empty(layout.nbytes, dtype=torch.uint8), *reader.weights(0, e))
        y = layout.forward(x, layout.views(blob), torch.nn.functional.silu) * weights[:, k, None]
        expected.index_add_(0, torch.tensor([0]), y.to(dtype))
    out = cache(0, x, ids, weights)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_in_flight_prefetch_is_never_evicted():
    reader = FakeReader(instant=False)
    cache, _ = make_cache(2, reader=reader)  # preload is synchronous: holds 0, 1
    cache.prefetch(0, [4])  # evicts the least recent (0); 4 is in flight
    lc = cache.layers[0]
    assert 4 in lc.loading and 4 in lc.slot_of
    cache.prefetch(0, [5])  # the only other slot holds 1: evictable, so 5 replaces 1
    assert set(lc.slot_of) == {4, 5}
    cache.prefetch(0, [2])  # both slots in flight: nothing to evict, no load
    assert 2 not in lc.slot_of and cache.stats.total().prefetch_issued == 2
    reader.complete_all()
    step(cache, [4])
    s = cache.stats.total()
    assert (s.hits, s.misses, s.prefetch_used) == (1, 0, 1)


def test_prediction_recall_counts_guessed_experts():
    cache, _ = make_cache(2)
    cache.prefetch(0, [3, 4])
    step(cache, [3, 5])
    s = cache.stats.total()
    assert (s.predicted_needed, s.needed_with_guess) == (1, 2)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_stats_are_consistent(policy):
    cache, _ = make_cache(2, policy=policy)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        experts = torch.randperm(E, generator=gen)[:2].tolist()
        if torch.rand(1, generator=gen) < 0.5:
            cache.prefetch(0, torch.randperm(E, generator=gen)[:2].tolist())
        step(cache, experts)
    s = cache.stats.total()
    d = cache.stats.as_dict(cache.expert_bytes)
    assert s.hits + s.misses == s.uses == 60
    assert 0 <= d["prefetch_precision"] <= 1 and 0 <= d["recall"] <= 1
    assert d["bytes_moved"] == s.misses * cache.expert_bytes
    assert d["bytes_from_disk"] == (s.misses + s.prefetch_issued) * cache.expert_bytes
