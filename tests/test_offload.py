"""Offloading never changes the math: same logits and tokens for every budget, policy and prefetch
setting, on every architecture; budgets are honoured; stats add up."""

import json
import subprocess
import sys
import threading

import pytest
import torch
from tiny import ARCHS, VOCAB, streaming_plan
from typer.testing import CliRunner

import moelocal
from moelocal.cli import app
from moelocal.errors import MoelocalError
from moelocal.perf_model import LAYER_OVERHEAD_S
from moelocal.synthetic import make_checkpoint

SETTINGS = [
    dict(cache_experts=1),
    dict(cache_experts=1, prefetch=False),
    dict(cache_experts=2, cache_policy="lfu"),
    dict(cache_experts=3, cache_policy="lfu", prefetch=False, prefetch_margin=0),
    dict(cache_experts=2, prefetch_margin=3),
    dict(cache_experts=2, prefetch_depth=2),
    dict(cache_experts=1, prefetch_depth=3, prefetch_margin=2),
]


def prompt(n, seed=1):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def resident_runs(tiny):
    """Per architecture: the all-resident logits and greedy tokens to compare with."""
    runs = {}

    def get(arch):
        if arch not in runs:
            engine = moelocal.load(tiny(arch)[0], device="cpu")
            assert set(engine.expert_cache.n_slots.values()) == {engine.config.num_experts}
            ids = prompt(20)
            runs[arch] = (
                ids,
                engine.logits(ids),
                engine.generate(ids, max_new_tokens=12).token_ids,
            )
        return runs[arch]

    return get


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_streaming_gives_identical_results(tiny, resident_runs, arch, setting):
    ids, logits, tokens = resident_runs(arch)
    engine = moelocal.load(tiny(arch)[0], device="cpu", **setting)
    assert engine.expert_cache.streaming
    assert torch.equal(engine.logits(ids), logits)
    out = engine.generate(ids, max_new_tokens=12)
    assert out.token_ids == tokens
    experts = out.stats.extra["experts"]
    assert experts["misses"] > 0  # it really streamed
    if not setting.get("prefetch", True):
        assert experts["prefetch_issued"] == experts["guesses_skipped"] == 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("prefetch", [True, False])
def test_learned_eviction_gives_identical_results(tiny, resident_runs, arch, prefetch,
                                                  monkeypatch):  # fmt: skip
    """Eviction fits (random ones, stored for the model as calibrate stores them) choose every
    victim, and change no logit or token."""
    from moelocal import predictor
    from moelocal.slot_map import Learned

    ids, logits, tokens = resident_runs(arch)
    plain = moelocal.load(tiny(arch)[0], device="cpu", cache_experts=3, prefetch=prefetch)
    moe = sorted(plain.expert_cache.n_slots)
    cfg, gen = plain.config, torch.Generator().manual_seed(0)
    reuse = {i: (torch.randn(cfg.num_experts, cfg.hidden_size, generator=gen),
                 torch.randn(cfg.num_experts, generator=gen)) for i in moe}  # fmt: skip
    fp = predictor.fingerprint(plain.model)
    stored = predictor.stored_path(fp)
    predictor.write(stored, predictor.RoutePredictors({}, reuse), fp)
    scored, victim = [], Learned.victim
    monkeypatch.setattr(Learned, "victim", lambda self, c: scored.append(
        self.expected is not None) or victim(self, c))  # fmt: skip
    try:
        engine = moelocal.load(tiny(arch)[0], device="cpu", cache_experts=3, prefetch=prefetch)
        assert engine.expert_cache.reuse.keys() == set(moe)
        assert torch.equal(engine.logits(ids), logits)
        assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
    finally:
        stored.unlink()
    assert scored and all(scored)  # every victim chosen by the scores


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("depth", [1, 2])
def test_guessing_every_layer_every_step_gives_identical_results(
    tiny, resident_runs, arch, depth, monkeypatch
):
    monkeypatch.setattr("moelocal.prefetch.PROBE", 1)  # no layer is ever left unguessed
    monkeypatch.setattr("moelocal.prefetch.MIN_PRECISION", 0)  # nor any guess left unloaded
    ids, logits, tokens = resident_runs(arch)
    engine = moelocal.load(tiny(arch)[0], device="cpu", cache_experts=1, prefetch_depth=depth)
    assert torch.equal(engine.logits(ids), logits)
    out = engine.generate(ids, max_new_tokens=12)
    assert out.token_ids == tokens
    experts = out.stats.extra["experts"]
    assert experts["guesses_skipped"] == 0 and experts["prefetch_issued"] > 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cpu_budget_forces_the_disk_tier(tiny, resident_runs, arch):
    path = tiny(arch)[0]
    full = moelocal.engine.plan(path, device="cpu", cpu_mem="1GiB")
    # a budget short of holding every expert: the embedding table (unless it is also the head)
    # is read from disk a row a token, and the rest of the resident part stays
    short = streaming_plan(path)
    tied = "embeddings" not in full.resident or full.resident["lm_head"] == 0
    assert short.on_disk == ({} if tied else {"embeddings": full.resident["embeddings"]})
    assert short.resident_bytes == full.resident_bytes - sum(short.on_disk.values())
    # room for that resident part, the KV cache, a prefill pass and two slots per layer
    budget = short.fixed_bytes + 2 * full.moe_layers * full.expert_bytes + 100
    engine = moelocal.load(path, device="cpu", cpu_mem=budget)
    assert engine.plan.device_slots == 2 and engine.plan.disk_experts > 0
    ids, logits, tokens = resident_runs(arch)
    assert torch.equal(engine.logits(ids), logits)
    out = engine.generate(ids, max_new_tokens=12)
    assert out.token_ids == tokens
    assert out.stats.extra["experts"]["bytes_from_disk"] > 0


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_room_short_of_a_slot_a_layer_gives_some_layers_one_more(tiny, arch):
    """A budget's room beyond n slots a layer, past a prefill pass's activations, holds one
    more slot in as many layers as it can (spread over them), and the tokens stay the same."""
    path = tiny(arch, num_hidden_layers=16)[0]
    resident, ids = moelocal.load(path, device="cpu"), prompt(20)
    logits, tokens = resident.logits(ids), resident.generate(ids, max_new_tokens=12).token_ids
    probe = streaming_plan(path, context=40)
    L, size = probe.moe_layers, probe.expert_bytes
    for extra in (0, 1, 3):
        # beside the fixed part (a prefill pass's activations included)
        budget = probe.fixed_bytes + (2 * L + extra) * size + size // 2
        assert (2 * L + extra) * size + size // 2 < 3 * L * size  # short of 3 slots a layer
        short = moelocal.engine.plan(path, device="cpu", cpu_mem=budget - size, context=40)
        want = (2, extra - 1) if extra else (1, L - 1)  # a slot less: 2 or 1 a layer and more
        assert (short.device_slots, short.extra_slots) == want
        engine = moelocal.load(path, device="cpu", cpu_mem=budget, context=40)
        counts = list(engine.expert_cache.n_slots.values())
        assert engine.plan.device_slots == 2 and engine.plan.extra_slots == extra
        want = [2] * (L - extra) + [3] * extra
        assert sorted(counts) == sorted(engine.plan.layer_slots()) == want
        assert [len(s) for s in engine.expert_cache.slots.values()] == counts
        assert engine.plan.cache_bytes == (2 * L + extra) * size
        assert torch.equal(engine.logits(ids), logits)
        assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
        engine.close()


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])  # layer 0 MoE, and dense
def test_a_moe_layer_0_is_guessed_from_the_embedding_before_its_attention(tiny, arch, monkeypatch):
    """Nothing earlier in a step can name layer 0's experts, and they follow mostly from the
    token: its guess is made from the embedding, each forward pass, before any layer runs."""
    from moelocal.prefetch import EMBEDDING, Prefetcher

    monkeypatch.setattr("moelocal.prefetch.FIRST_PROBE", 1)  # every layer guessed, every step
    monkeypatch.setattr("moelocal.prefetch.PROBE", 1)
    calls, call = [], Prefetcher.__call__
    monkeypatch.setattr(Prefetcher, "__call__",
                        lambda self, layers, i, h: calls.append((i, h.clone()))
                        or call(self, layers, i, h))  # fmt: skip
    engine = moelocal.load(tiny(arch)[0], device="cpu", cache_experts=1)
    ids = list(range(3, 11))
    out = engine.generate(ids, max_new_tokens=4)
    embed = engine.model.model.embed_tokens
    firsts = [(i, h) for n, (i, h) in enumerate(calls) if n == 0 or calls[n - 1][0] > i]
    layer_0_moe = engine.model.cfg.moe_layers[0]
    assert len(firsts) == 4 and all((i == EMBEDDING) == layer_0_moe for i, _ in firsts)
    if layer_0_moe:  # the prompt's embedding, then each decoded token's
        assert torch.equal(firsts[0][1], embed(torch.tensor([ids])))
        for (_, h), token in zip(firsts[1:], out.token_ids, strict=False):
            assert torch.equal(h, embed(torch.tensor([[token]])))
    guessed = engine.expert_cache.stats.layer(0).needed_with_guess if layer_0_moe else 0
    assert (guessed > 0) == layer_0_moe
    engine.close()


def test_the_next_tokens_layer_0_is_guessed_from_the_heads_likeliest_tokens(tiny, monkeypatch):
    """Read off a hidden state of this step, the head's likeliest next tokens name layer 0's
    experts through their embeddings: with one token, exactly its top k in layer 0, for each
    sequence; with more, k + margin of those their top k name."""
    from moelocal import prefetch

    engine = moelocal.load(tiny("mixtral")[0], device="cpu", cache_experts=1)
    model, layers = engine.model, engine.model.model.layers
    h = torch.randn(2, 3, model.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(prefetch, "NEXT_TOKENS", 1)
    tokens = model.head(h[:, -1]).argmax(-1)  # each sequence's likeliest
    own = layers[0].route(model.embed(tokens)[:, None], 0)[0].tolist()
    assert set(prefetch.guess_next(model, layers, h, margin=1)) == {e for r in own for e in r}
    monkeypatch.setattr(prefetch, "NEXT_TOKENS", 3)
    likeliest = model.head(h[0, -1]).topk(3).indices
    named = {e for r in layers[0].route(model.embed(likeliest)[:, None], 0)[0].tolist() for e in r}
    ranked = prefetch.guess_next(model, layers, h[:1], margin=1)
    assert set(ranked) <= named and len(ranked) == min(3, len(named))
    engine.close()


@pytest.mark.parametrize("depth", [1, 2])
def test_a_streaming_budget_gives_the_prefetcher_rows_beside_the_slots(tiny, depth):
    """Guesses are read into rows of their own (a wrong one evicts nothing): top-k for each layer
    guessed ahead (layer 0's guess for the next token among them: dense first or not), out of a
    budget's room for slots but never taking a layer's only slot; none without prefetch or where
    every expert has its slot."""
    path = tiny("mixtral", num_hidden_layers=4)[0]
    probe = streaming_plan(path, context=40, prefetch_depth=depth)
    L, size, k = probe.moe_layers, probe.expert_bytes, probe.top_k
    wanted = k * depth
    assert probe.guess_rows == wanted and probe.fixed_bytes >= probe.guess_bytes > 0
    dense_first = streaming_plan(tiny("deepseek_v3", num_hidden_layers=4)[0], context=40,
                                 prefetch_depth=depth)  # fmt: skip
    assert dense_first.guess_rows == dense_first.top_k * depth
    room = probe.fixed_bytes - probe.guess_bytes  # what a budget holds besides slots and rows
    for rows in range(wanted + 1):  # a slot a layer, and room for `rows` more experts
        plan = moelocal.engine.plan(path, device="cpu", cpu_mem=room + (L + rows) * size,
                                    context=40, prefetch_depth=depth)  # fmt: skip
        assert (plan.device_slots, plan.extra_slots, plan.guess_rows) == (1, 0, rows)
    off = moelocal.engine.plan(path, device="cpu", cpu_mem=room + (L + 1) * size, context=40,
                               prefetch=False)  # fmt: skip
    assert (off.device_slots, off.extra_slots, off.guess_rows) == (1, 1, 0)
    assert moelocal.engine.plan(path, device="cpu", context=40).guess_rows == 0  # all resident
    assert moelocal.engine.plan(path, device="cpu", cache_experts=2).guess_rows == k
    engine = moelocal.load(path, device="cpu", cpu_mem=room + (L + k) * size, context=40)
    assert len(engine.expert_cache.spares.rows) == engine.plan.guess_rows == k
    engine.close()


def test_a_budget_holds_a_prefill_pass_and_its_default_context_shrinks_to_fit(tiny):
    """A CPU budget holds the activations of a prefill pass over its context (a long prompt got
    a process planned without them killed under its cap); a budget's default context is halved
    until it fits beside a slot a layer, said in a note; a given one that does not fit is one
    line."""
    path = tiny("mixtral", max_position_embeddings=4096)[0]
    default = streaming_plan(path)
    assert default.context == 4096 and default.prefill_bytes > 0
    L, size = default.moe_layers, default.expert_bytes
    budget = streaming_plan(path, context=1024).fixed_bytes + L * size + 1
    plan = moelocal.engine.plan(path, device="cpu", cpu_mem=budget)
    assert plan.context == 1024 and "planned a context of 1024 tokens" in plan.notes[-1]
    assert plan.device_slots == 1 and plan.fixed_bytes + plan.cache_bytes <= budget
    with pytest.raises(MoelocalError, match="smaller --context"):
        moelocal.engine.plan(path, device="cpu", cpu_mem=budget, context=2048)
    result = CliRunner().invoke(app, ["plan", str(path), "--cpu-mem", str(budget), "--context",
                                      "2048"])  # fmt: skip
    assert result.exit_code == 1 and result.stderr.count("\n") == 1


@pytest.mark.parametrize("intermediate", [None, 100])  # blobs of whole blocks; a partial last one
def test_converted_experts_need_no_staging_room(tiny, tmp_path, intermediate):
    """A converted expert is read straight into its slot (but for a last partial block), so the
    plan keeps no staging buffer of an expert's size per I/O thread: that room holds slots."""
    from moelocal.convert import convert
    from moelocal.direct_io import IO_THREADS

    overrides = {} if intermediate is None else {"intermediate_size": intermediate}
    path = convert(str(tiny("mixtral", **overrides)[0]), "none", tmp_path / "converted")
    resident, ids = moelocal.load(path, device="cpu"), prompt(20)
    logits, tokens = resident.logits(ids), resident.generate(ids, max_new_tokens=12).token_ids
    full = streaming_plan(path)
    budget = (full.fixed_bytes - full.staging_bytes + 2 * full.moe_layers * full.expert_bytes
              + IO_THREADS * full.expert_bytes // 2)  # fmt: skip
    engine = moelocal.load(path, device="cpu", cpu_mem=budget)
    assert engine.plan.device_slots == 2
    assert torch.equal(engine.logits(ids), logits)
    assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
    assert engine.expert_cache.stats.total().misses > 0
    engine.close()


def test_sharded_checkpoint_streams_the_same(tmp_path, resident_runs):
    from tiny import save_tiny

    save_tiny(tmp_path / "sharded", "qwen2_moe", seed=0, max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    ids, logits, tokens = resident_runs("qwen2_moe")
    engine = moelocal.load(tmp_path / "sharded", device="cpu", cache_experts=1)
    assert torch.equal(engine.logits(ids), logits)
    assert engine.generate(ids, max_new_tokens=12).token_ids == tokens


def test_budget_holding_every_expert_never_misses(tiny):
    engine = moelocal.load(tiny("olmoe")[0], device="cpu", cpu_mem="512MiB")
    assert not engine.expert_cache.streaming
    for seed in range(3):
        out = engine.generate(prompt(10, seed), max_new_tokens=8)
        assert out.stats.extra["experts"]["misses"] == 0
        assert out.stats.extra["experts"]["hits"] == out.stats.extra["experts"]["expert_uses"] > 0


def test_impossible_budget_is_one_line(tiny):
    path = tiny("mixtral")[0]
    with pytest.raises(MoelocalError, match="model needs at least .* --cpu-mem .* is too small"):
        moelocal.load(path, device="cpu", cpu_mem="100KB")
    result = CliRunner().invoke(app, ["generate", str(path), "-p", "hi", "--cpu-mem", "100KB"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "needs at least" in result.stderr


@pytest.mark.parametrize("bad", [["--cpu-mem", "lots"], ["--cache-policy", "fifo"],
                                 ["--cache-experts", "0"], ["--miss-policy", "never"],
                                 ["--context", "-5"], ["--context", "0"],
                                 ["--prefetch-depth", "0"]])  # fmt: skip
def test_bad_offload_options_are_one_line(bad):
    result = CliRunner().invoke(app, ["generate", "-p", "hi", "-n", "1", *bad])
    assert result.exit_code == 1 and result.stderr.startswith("error:"), result.output


def test_stats_add_up(tiny):
    engine = moelocal.load(tiny("qwen3_moe")[0], device="cpu", cache_experts=2)
    out = engine.generate(prompt(16), max_new_tokens=10)
    s = out.stats.extra["experts"]
    assert s["hits"] + s["prefetch_used"] + s["misses"] == s["expert_uses"]
    assert 0 <= s["prefetch_precision"] <= 1 and 0 <= s["prefetch_recall"] <= 1
    assert s["hit_rate"] == pytest.approx(s["hits"] / s["expert_uses"], abs=1e-4)
    assert s["demand_bytes"] == s["misses"] * s["expert_bytes"]
    assert s["prefetch_bytes"] == s["prefetch_issued"] * s["expert_bytes"]
    # one definition of bytes moved: every byte copied into a slot, by a miss or a prefetch
    assert s["bytes_moved"] == s["bytes_from_disk"] == s["demand_bytes"] + s["prefetch_bytes"]
    per_layer = s["per_layer"].values()
    assert sum(layer["misses"] for layer in per_layer) == s["misses"]
    assert sum(layer["expert_uses"] for layer in per_layer) == s["expert_uses"]
    # the engine's running totals include this generation
    assert engine.stats["experts"]["expert_uses"] >= s["expert_uses"]
    no_prefetch = moelocal.load(tiny("qwen3_moe")[0], device="cpu", cache_experts=2, prefetch=False)
    s = no_prefetch.generate(prompt(16), max_new_tokens=10).stats.extra["experts"]
    assert s["bytes_moved"] == s["misses"] * s["expert_bytes"] and s["prefetch_used"] == 0


def test_generate_cli_reports_offload_stats():
    result = CliRunner().invoke(
        app, ["generate", "-p", "Hi", "-n", "6", "--cache-experts", "2", "--cache-policy", "lfu",
              "--no-prefetch", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert stats["experts"]["misses"] > 0 and stats["experts"]["prefetch_issued"] == 0
    assert stats["memory"]["peak_rss_bytes"] > 0


def test_generate_plans_the_context_its_prompt_needs():
    """One prompt's generate plans a context of its prompt and max_new_tokens (not a budget's
    default of 4096 tokens, whose KV cache and prefill room would come out of the expert
    slots); --context still sets it."""
    for extra, want in (([], None), (["--context", "300"], 300)):
        result = CliRunner().invoke(
            app, ["generate", "-p", "Tell me about experts", "-n", "7", "--cpu-mem", "40MiB",
                  "--json", *extra],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        stats = json.loads(result.stdout)["stats"]
        assert stats["context"] == (want or stats["prompt_tokens"] + 7)
        assert stats["prompt_tokens"] > 5  # the chat template's tokens counted too


def test_plan_cli(tiny):
    path = tiny("deepseek_v2")[0]
    result = CliRunner().invoke(app, ["plan", str(path), "--cache-experts", "3", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["device_slots_per_layer"] == 3 and plan["moe_layers"] == 2
    assert plan["disk_experts"] == 2 * (8 - 3)
    assert plan["resident"]["dense_mlp"] > 0 and plan["resident"]["shared_experts"] > 0
    # no --hit-rate: the share of a layer's experts cached (3 of 8), as even routing has it
    assert plan["hit_rate"] == 3 / 8
    assert plan["bytes_moved_per_token"] == pytest.approx(2 * 2 * 5 / 8 * plan["expert_bytes"])
    given = CliRunner().invoke(app, ["plan", str(path), "--cache-experts", "3", "--hit-rate",
                                     "0.8", "--json"])  # fmt: skip
    assert json.loads(given.stdout)["bytes_moved_per_token"] == pytest.approx(
        2 * 2 * 0.2 * plan["expert_bytes"]
    )
    assert plan["memory_bytes_per_s"] > 0 and plan["disk_bytes_per_s"] > 0
    assert plan["bytes_read_per_token"] > plan["moe_layers"] * 2 * plan["expert_bytes"]
    assert plan["predicted_tok_s"] > 0
    table = CliRunner().invoke(app, ["plan", str(path), "--cache-experts", "3"])
    assert "expert cache" in table.stdout and "disk: 10 experts" in table.stdout
    assert "predicted decode:" in table.stdout


def test_predicted_speed_falls_with_the_hit_rate_and_ignores_it_when_all_is_cached(tiny):
    from moelocal.perf_model import Bandwidths, predicted_seconds

    path = tiny("mixtral")[0]
    streamed = moelocal.engine.plan(path, device="cpu", cache_experts=2)
    rates = Bandwidths(memory=20e9, disk=1e9)
    times = [predicted_seconds(streamed, h, rates) for h in (0.2, 0.5, 0.9, 1.0)]
    assert times == sorted(times, reverse=True)
    # at a 100% hit rate: the weights a token reads, and each layer's fixed cost
    assert times[-1] == pytest.approx(streamed.bytes_read_per_token() / 20e9
                                      + streamed.layers * LAYER_OVERHEAD_S)  # fmt: skip
    resident = moelocal.engine.plan(path, device="cpu")
    assert predicted_seconds(resident, 0.1, rates) == predicted_seconds(resident, 1.0, rates)


def test_plan_takes_the_hit_rate_from_a_trace(tmp_path):
    from moelocal.trace import RoutingTrace

    trace = tmp_path / "t.jsonl"
    runner = CliRunner()
    assert runner.invoke(app, ["bench", "-p", "8", "-n", "9", "-r", "1", "--trace",
                               str(trace)]).exit_code == 0  # fmt: skip
    result = runner.invoke(app, ["plan", "--cache-experts", "3", "--trace", str(trace), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    recorded = RoutingTrace.load(trace)
    # the default model's trace holds its eviction scores: the learned policy's hit rate
    assert recorded.expected_by_layer() and plan["hit_rate"] == recorded.hit_rate([3] * 6, False)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    stripped = tmp_path / "lru.jsonl"  # a trace without scores: LRU's
    stripped.write_text("\n".join(json.dumps({k: v for k, v in x.items() if k != "expected"})
                                  for x in lines))  # fmt: skip
    result = runner.invoke(
        app, ["plan", "--cache-experts", "3", "--trace", str(stripped), "--json"]
    )
    assert json.loads(result.stdout)["hit_rate"] == recorded.lru_hit_rate(3)
    other = json.loads(trace.read_text().splitlines()[0]) | {"experts": 64}
    trace.write_text("\n".join([json.dumps(other), *trace.read_text().splitlines()[1:]]))
    wrong = runner.invoke(app, ["plan", "--cache-experts", "3", "--trace", str(trace)])
    assert wrong.exit_code == 1 and wrong.stderr.count("\n") == 1 and "64 experts" in wrong.stderr


@pytest.mark.parametrize("converted", [False, True])
def test_peak_memory_stays_within_budget(tmp_path, converted):
    """Peak RSS over a warmed-up process stays within --cpu-mem plus the stated fixed overhead
    (README: 64 MiB for kernels' scratch, allocator slack, threads and the tokenizer). A
    converted model plans no staging buffers for whole experts: they are read into their slots."""
    from moelocal.convert import convert

    path = make_checkpoint(tmp_path / "m", hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=4, vocab_size=2048)  # fmt: skip
    if converted:
        path = convert(str(path), "none", tmp_path / "converted")
    experts_bytes = 4 * 8 * 3 * 512 * 1536 * 2  # 144 MiB of experts on disk
    budget = 72 * 2**20
    script = """
import json, sys, psutil, torch, moelocal
path, budget = sys.argv[1], int(sys.argv[2])
moelocal.engine.plan(path, device="cpu", cpu_mem=budget, context=512)  # imports, meta model
torch.nn.functional.linear(torch.randn(2, 512, dtype=torch.bfloat16),
                           torch.randn(64, 512, dtype=torch.bfloat16))  # kernels
base = psutil.Process().memory_info().rss
engine = moelocal.load(path, device="cpu", cpu_mem=budget, context=512)
out = engine.generate("hello " * 60, max_new_tokens=48)
peak = engine.memory()["peak_rss_bytes"]
print(json.dumps(dict(base=base, peak=peak, slots=engine.plan.device_slots,
                      misses=out.stats.extra["experts"]["misses"])))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(budget)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert budget < experts_bytes and 1 <= m["slots"] < 8 and m["misses"] > 0
    assert m["peak"] - m["base"] <= budget + 64 * 2**20, (m["peak"] / 2**20, m["base"] / 2**20)


def test_stats_by_key_and_on_the_engine(tiny):
    engine = moelocal.load(tiny("olmoe")[0], device="cpu", cache_experts=2)
    out = engine.generate(prompt(8), max_new_tokens=4)
    assert out.stats["hits"] == out.stats["experts"]["hits"] == out.stats.experts["hits"]
    assert out.stats["decode_tokens_per_s"] == pytest.approx(
        out.stats.decode_tokens_per_s, abs=1e-3
    )
    assert engine.stats["misses"] == engine.stats["experts"]["misses"] >= out.stats["misses"]
    assert set(engine.stats["experts"]["per_layer"]) == {"0", "1", "2"}


@pytest.mark.parametrize("miss_policy", ["load", "cpu", "auto"])
def test_cuda_plan_counts_a_host_store_of_whole_layers(tiny, miss_policy):
    """The CUDA plan's bookkeeping, checked without a GPU: the host store holds the same number
    of experts in every layer, fits --cpu-mem with the staging pieces, and the miss policy is a
    token count fixed by the plan, not a timing."""
    from moelocal.checkpoint import Checkpoint
    from moelocal.loader import plan_model
    from moelocal.plan import OffloadOptions

    path = tiny("mixtral")[0]
    free = plan_model(Checkpoint(path), torch.device("cuda"), None, OffloadOptions()).plan
    for room in (1, 3, 7):
        budget = free.staging_bytes + room * free.expert_bytes + free.expert_bytes // 2
        options = OffloadOptions(cpu_mem=budget, miss_policy=miss_policy)
        p = plan_model(Checkpoint(path), torch.device("cuda"), None, options).plan
        assert p.host_experts % p.moe_layers == 0 and p.host_experts <= room
        assert p.host_experts >= room - p.moe_layers + 1
        assert p.staging_bytes + p.host_experts * p.expert_bytes <= budget
        assert p.cpu_miss_tokens == {"load": 0, "cpu": 2**62, "auto": 4}[miss_policy]


def test_close_releases_io_threads_and_files(tiny):
    def io_threads():
        return [t for t in threading.enumerate() if t.name.startswith("moelocal-io")]

    before = len(io_threads())
    with moelocal.load(tiny("mixtral")[0], device="cpu", cache_experts=1) as engine:
        reader = engine.expert_cache.mover.reader
        assert len(io_threads()) > before and reader.fds
        engine.generate(prompt(8), max_new_tokens=3)
    assert len(io_threads()) == before and not reader.fds
    with pytest.raises(moelocal.MoelocalError, match="closed"):
        engine.generate(prompt(8), max_new_tokens=3)
    engine.close()  # twice: nothing


@pytest.mark.parametrize("converted", [False, True])
def test_streaming_without_linux_only_calls(tiny, resident_runs, tmp_path, monkeypatch, converted):
    """Where O_DIRECT, preadv and posix_fadvise do not exist (macOS), streaming takes the
    platform's other calls and gives the same tokens."""
    import os

    from moelocal.convert import convert

    path = tiny("mixtral")[0]
    if converted:  # a converted model's blobs are read the same way
        path = convert(str(path), "none", tmp_path / "packed")
    for name in ("O_DIRECT", "preadv", "posix_fadvise"):
        monkeypatch.delattr(os, name, raising=False)
    ids, logits, tokens = resident_runs("mixtral")
    engine = moelocal.load(path, device="cpu", cache_experts=1)
    assert torch.equal(engine.logits(ids), logits)
    assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
    assert engine.expert_cache.stats.total().misses > 0
    engine.close()


def test_embedding_rows_read_from_disk_are_the_table_s(tmp_path):
    """DiskEmbedding gives nn.Embedding's rows for any token shape, repeats included, cast to
    the compute dtype as the resident table would be; a file too short is one line, at once."""
    from safetensors.torch import save_file

    from moelocal.disk_embedding import DiskEmbedding
    from moelocal.store import tensor_offsets

    table = torch.randn(50, 24, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "w.safetensors"
    save_file({"other": torch.ones(7), "model.embed_tokens.weight": table}, str(path))
    offset, _, stored, shape = tensor_offsets(path)["model.embed_tokens.weight"]
    rows = DiskEmbedding(path, offset, stored, shape, torch.bfloat16)
    tokens = torch.tensor([[3, 49, 3, 0], [7, 7, 7, 12]])
    want = torch.nn.functional.embedding(tokens, table.to(torch.bfloat16))
    assert torch.equal(rows(tokens), want) and torch.equal(rows(tokens[:1, 1:2]), want[:1, 1:2])
    rows.close()
    rows.close()  # twice: nothing
    with open(path, "r+b") as f:
        f.truncate(offset + 49 * 24 * 4)
    with pytest.raises(MoelocalError, match="truncated"):
        DiskEmbedding(path, offset, stored, shape, torch.bfloat16)


def test_generation_is_the_same_with_the_embedding_table_on_disk(tiny, resident_runs, tmp_path):
    """Under a budget that streams the experts, a converted model and a checkpoint both read
    their embedding table from disk, give the resident tokens, and close the file with the
    engine."""
    from moelocal.convert import convert

    ids, logits, tokens = resident_runs("mixtral")
    source = tiny("mixtral")[0]
    for path in (source, convert(str(source), "none", tmp_path / "converted")):
        full = moelocal.engine.plan(path, device="cpu")
        budget = streaming_plan(path).fixed_bytes + full.cache_bytes // 2
        engine = moelocal.load(path, device="cpu", cpu_mem=budget)
        embedding = engine.model.model.embed_tokens
        assert engine.plan.on_disk == {"embeddings": full.resident["embeddings"]}
        assert torch.equal(engine.logits(ids), logits)
        assert engine.generate(ids, max_new_tokens=12).token_ids == tokens
        engine.close()
        assert embedding.fd == -1
