"""The CUDA path: device slots, page-locked host store, copies on a side stream, miss policies.

Skipped without a GPU (this project's CI has none); run on a lent accelerator.
"""

import pytest
import torch
from tiny import VOCAB

import moelocal
from moelocal.quant import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def prompt(n, seed=2):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def resident(tiny):
    path = tiny("mixtral")[0]
    engine = moelocal.load(path, device="cuda")
    ids = prompt(20)
    return path, ids, engine.logits(ids), engine.generate(ids, max_new_tokens=12).token_ids


class TestCuda:
    def test_resident_matches_cpu(self, tiny, resident):
        path, ids, logits, tokens = resident
        cpu = moelocal.load(path, device="cpu")
        assert (cpu.logits(ids) - logits).abs().max() < 1e-3
        assert cpu.generate(ids, max_new_tokens=12).token_ids == tokens

    @pytest.mark.parametrize("prefetch", [True, False])
    def test_streamed_from_host_store_is_identical(self, resident, prefetch):
        path, ids, logits, tokens = resident
        engine = moelocal.load(path, device="cuda", cache_experts=1, prefetch=prefetch,
                               miss_policy="load")  # fmt: skip
        mover = engine.expert_cache.mover
        assert mover.host and all(blob.is_pinned() for blob in mover.host.values())
        assert mover.copy_stream != torch.cuda.current_stream()
        assert torch.equal(engine.logits(ids), logits)
        out = engine.generate(ids, max_new_tokens=12)
        assert out.token_ids == tokens
        assert out.stats.extra["experts"]["bytes_from_host"] > 0

    def test_disk_tier_behind_host_store(self, resident):
        path, ids, logits, tokens = resident
        plan = moelocal.engine.plan(path, device="cuda", cache_experts=1)
        # room for one expert of every layer in RAM: the rest are read from disk
        cpu_mem = plan.staging_bytes + plan.moe_layers * plan.expert_bytes
        engine = moelocal.load(path, device="cuda", cache_experts=1, miss_policy="load",
                               cpu_mem=cpu_mem)  # fmt: skip
        assert 0 < len(engine.expert_cache.mover.host) < plan.total_experts
        assert torch.equal(engine.logits(ids), logits)
        out = engine.generate(ids, max_new_tokens=12)
        assert out.token_ids == tokens
        assert out.stats.extra["experts"]["bytes_from_disk"] > 0

    @pytest.mark.parametrize("miss_policy", ["cpu", "auto"])
    def test_cpu_miss_policy_gives_the_same_tokens(self, resident, miss_policy):
        path, ids, logits, tokens = resident
        engine = moelocal.load(path, device="cuda", cache_experts=1, miss_policy=miss_policy)
        assert (engine.logits(ids) - logits).abs().max() < 1e-3
        out = engine.generate(ids, max_new_tokens=12)
        assert out.token_ids == tokens
        assert out.stats.extra["experts"]["cpu_computed"] > 0
        # auto is a rule on token counts, not a timing: decode's one-token misses run on the CPU
        # (without guesses, whose landing in time is a timing)
        counts = []
        for _ in range(2):
            again = moelocal.load(path, device="cuda", cache_experts=1, miss_policy=miss_policy,
                                  prefetch=False)  # fmt: skip
            out = again.generate(ids, max_new_tokens=12)
            assert out.token_ids == tokens
            counts.append(out.stats.extra["experts"]["cpu_computed"])
        assert counts[0] == counts[1] > 0

    def test_host_store_is_one_page_locked_arena_counted_in_the_plan(self, resident):
        path, ids, _, tokens = resident
        plan = moelocal.engine.plan(path, device="cuda", cache_experts=1)
        with moelocal.load(path, device="cuda", cache_experts=1, miss_policy="load") as engine:
            mover = engine.expert_cache.mover
            assert len(mover.host) == plan.host_experts == engine.plan.host_experts
            arena = mover.host_arena.buf
            assert arena.numel() == plan.host_experts * plan.expert_bytes and arena.is_pinned()
            assert engine.memory()["host_store_bytes"] == arena.numel()
            assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
        assert not mover.host_arena.registered and not mover.staging_arena.registered

    def test_gpu_budget_is_honoured(self, resident):
        path, ids, _, tokens = resident
        plan = moelocal.engine.plan(path, device="cuda", cache_experts=1, context=256)
        # two slots a layer, and the prefetcher's rows beside them
        rows = 2 * plan.moe_layers + plan.guess_rows
        budget = plan.resident_bytes + plan.kv_bytes + rows * plan.expert_bytes
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # the other tests' engines
        engine = moelocal.load(path, device="cuda", gpu_mem=budget, context=256)
        assert engine.plan.device_slots == 2 and engine.plan.guess_rows == plan.guess_rows > 0
        assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
        # activations and the CUDA allocator's rounding are the stated overhead
        assert torch.cuda.max_memory_allocated() - before <= budget + 16 * 2**20

    @pytest.mark.parametrize("mode", ["int8", "nf4"])
    def test_quantized_on_cuda(self, tiny, mode):
        """int8 (dequantized + bf16 GEMM) and nf4 (bitsandbytes' kernels) on the GPU: every
        quantized Linear the same weights as on the CPU and close to the CPU's kernels in what it
        computes, and the model identical whatever is streamed. (The whole model's logits are not
        compared: where two experts' router logits nearly tie, a last-bit difference picks
        another expert, which a tiny random model's tokens often do.)"""
        path, ids = tiny("mixtral")[0], prompt(20)
        gpu = moelocal.load(path, device="cuda", quant=mode)
        cpu = moelocal.load(path, device="cpu", quant=mode)
        on_cpu = dict(cpu.model.named_modules())
        linears = [(n, m) for n, m in gpu.model.named_modules() if isinstance(m, QuantLinear)]
        assert linears
        for name, linear in linears:
            twin = on_cpu[name]
            assert all(torch.equal(t.cpu(), twin.get_buffer(k)) for k, t in linear.named_buffers())
            x = torch.randn(5, linear.fmt.K, generator=torch.Generator().manual_seed(1))
            a, b = linear(x.cuda()).float().cpu(), twin(x).float()
            assert ((a - b).norm() / b.norm()).item() < 0.02, name
        tokens = gpu.generate(ids, max_new_tokens=8).token_ids
        streamed = moelocal.load(
            path, device="cuda", quant=mode, cache_experts=1, miss_policy="load"
        )
        assert torch.equal(streamed.logits(ids), gpu.logits(ids))
        assert streamed.generate(ids, max_new_tokens=8).token_ids == tokens


def test_small_arenas_side_by_side_are_each_page_locked():
    """Registration is by whole pages: two arenas smaller than a page (a tiny model's) must not
    share one, or the second fails to register."""
    from moelocal.movers import PinnedArena

    arenas = [PinnedArena(3, 1000) for _ in range(4)]
    try:
        for arena in arenas:
            assert arena.registered and all(piece.is_pinned() for piece in arena.pieces)
            arena.pieces[1].fill_(7)
            assert torch.equal(
                arena.pieces[1].cuda().cpu(), torch.full((1000,), 7, dtype=torch.uint8)
            )
    finally:
        for arena in arenas:
            arena.close()
    assert not any(arena.registered for arena in arenas)
