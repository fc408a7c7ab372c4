"""Routing traces (`moelocal bench --trace`) and the cache policies replayed on them."""

import json
import random
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moelocal.cli import app
from moelocal.trace import RoutingTrace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from cache_sim import POLICIES, hit_rate  # noqa: E402

runner = CliRunner()


def bench_trace(path, *args):
    return runner.invoke(app, ["bench", "-p", "24", "-n", "9", "-r", "2", "--json",
                               "--trace", str(path), *args])  # fmt: skip


def test_bench_records_the_decode_routing(tmp_path):
    path = tmp_path / "trace.jsonl"
    result = bench_trace(path, "--cache-experts", "2,8")
    assert result.exit_code == 0, result.output
    trace = RoutingTrace.load(path)
    h = trace.header
    assert h["model"] == "default" and h["top_k"] == 2 and h["experts"] == 8
    assert len(trace.steps) == 8 * len(h["moe_layers"])  # 8 decode steps, the first row only
    assert [layer for layer, _, _ in trace.steps[: len(h["moe_layers"])]] == h["moe_layers"]
    for _, experts, routed in trace.steps:
        assert len(experts) == 2 and routed == 2 and all(0 <= e < 8 for e in experts)
    # the default model ships eviction fits: the scores the learned policy saw, every step
    assert all(len(x) == 8 for x in trace.expected)
    assert trace.expected_by_layer().keys() == trace.by_layer().keys()
    # the prefetcher's guesses of each layer from each of the up to 4 layers before it; layer
    # 0's from the embedding (0) and, but in the first step, read off the head 1..4 layers
    # before the previous token's end (as many experts as the head's likeliest tokens name)
    layers = h["moe_layers"]
    for n, ((layer, _, _), guesses) in enumerate(zip(trace.steps, trace.guesses, strict=True)):
        if layer == 0:
            assert sorted(guesses) == ([0] if n == 0 else [0, 1, 2, 3, 4])
            assert all(2 <= len(g) <= 3 and len(set(g)) == len(g) for g in guesses.values())
            assert len(guesses[0]) == 3
        else:
            assert sorted(guesses) == list(range(1, min(layers.index(layer), 4) + 1))
            assert all(len(g) == 3 and len(set(g)) == 3 for g in guesses.values())  # k + 1
    # greedy decode of the same prompt: the same routing (and guesses) whatever the cache's size
    again = tmp_path / "again.jsonl"
    assert bench_trace(again, "--cache-experts", "8").exit_code == 0
    assert RoutingTrace.load(again).steps == trace.steps
    assert RoutingTrace.load(again).guesses == trace.guesses
    assert RoutingTrace.load(again).expected == trace.expected


def test_replay_runs_the_trace_through_the_cache(tmp_path):
    import subprocess

    from moelocal.hub import resolve_model

    path = tmp_path / "trace.jsonl"
    assert bench_trace(path, "--cache-experts", "2").exit_code == 0
    script = Path(__file__).resolve().parent.parent / "scripts" / "replay_trace.py"
    like = str(resolve_model(None))
    out = subprocess.run([sys.executable, str(script), str(path), "--like", like,
                          "--layer-ms", "0.1", "--slots", "2", "--rounds", "1", "--dir",
                          str(tmp_path), "--prefetch", "off,oracle,router1,router2,router1e,"
                          "router1x"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {r.split("|")[2].strip(): r.split("|")[1:-1] for r in out.stdout.splitlines()
            if r.startswith("| 2 |")}  # fmt: skip
    assert list(rows) == ["off", "oracle", "router1", "router2", "router1e", "router1x"]
    precision, recall = 9, 10
    assert float(rows["oracle"][precision]) == float(rows["oracle"][recall]) == 1.0
    assert float(rows["off"][recall]) == 0.0 and 0 < float(rows["router1"][recall]) <= 1


def test_a_file_that_is_not_a_trace_is_not_overwritten(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    result = bench_trace(notes)
    assert result.exit_code == 1 and "not a routing trace" in result.stderr
    assert notes.read_text() == "keep me"
    missing = bench_trace(tmp_path / "no" / "t.jsonl")
    assert missing.exit_code == 1 and "no such directory" in missing.stderr


@pytest.mark.parametrize("seed", range(5))
def test_belady_bounds_every_policy(seed):
    rng = random.Random(seed)
    E, k = 8, 2
    hot = rng.sample(range(E), 3)  # some locality, as trained routing has
    trace = [set(rng.sample(hot if rng.random() < 0.5 else range(E), k)) for _ in range(400)]
    for slots in range(1, E + 1):
        best = hit_rate(trace, slots, POLICIES["Belady"])
        for name, policy in POLICIES.items():
            assert hit_rate(trace, slots, policy) <= best + 1e-12, (name, slots)
    first_uses = len(set().union(*trace))
    uses = sum(len(t) for t in trace)
    for policy in POLICIES.values():  # every expert fits: only the first use of each misses
        assert hit_rate(trace, E, policy) == pytest.approx(1 - first_uses / uses)


@pytest.mark.parametrize("seed", range(3))
def test_the_traces_own_lru_agrees_with_cache_sim(seed):
    rng = random.Random(seed)
    trace = RoutingTrace({"moe_layers": [0, 1]})
    for _ in range(200):
        for layer in (0, 1):
            trace.record(layer, [rng.randrange(8)], 1)  # top 1: no ties for the victim
    by_layer = trace.by_layer()
    for slots in range(1, 9):
        simulated = sum(hit_rate(t, slots, POLICIES["LRU"]) for t in by_layer.values()) / 2
        assert trace.lru_hit_rate(slots) == pytest.approx(simulated)
        # each layer's own count (a plan gives some layers one slot more)
        other = 1 + slots % 8
        simulated = (hit_rate(by_layer[0], slots, POLICIES["LRU"])
                     + hit_rate(by_layer[1], other, POLICIES["LRU"])) / 2  # fmt: skip
        assert trace.lru_hit_rate([slots, other]) == pytest.approx(simulated)


def cache_sim_rows(path: Path, steps: list[dict]) -> dict[str, list[str]]:
    """scripts/cache_sim.py on a one-layer trace of 4 experts, top 1: policy -> its row."""
    import subprocess

    header = {"model": "m", "experts": 4, "top_k": 1, "moe_layers": [0]}
    path.write_text("\n".join(json.dumps(x) for x in [header, *steps]) + "\n")
    script = Path(__file__).resolve().parent.parent / "scripts" / "cache_sim.py"
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                         text=True, timeout=60).stdout  # fmt: skip
    return {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| ") and "policy" not in line}  # fmt: skip


def test_cache_sim_reads_a_trace(tmp_path):
    steps = [{"layer": 0, "experts": [e], "routed": 1} for e in (0, 1, 0, 2, 0, 3, 0)]
    rows = cache_sim_rows(tmp_path / "trace.jsonl", steps)
    # 2 slots: expert 0 comes back every other step; LRU keeps it (3 hits of 7), as Belady does
    assert float(rows["LRU"][1]) == pytest.approx(3 / 7, abs=1e-3)
    assert float(rows["Belady"][1]) == pytest.approx(3 / 7, abs=1e-3)
    assert "learned" not in rows  # no scores in the trace


def test_cache_sim_replays_the_learned_scores_a_trace_holds(tmp_path):
    # 0, 1, 2 in turn thrash LRU's 2 slots; scores that rate 0 highest keep it
    steps = [{"layer": 0, "experts": [e], "routed": 1, "expected": [1.0, 0.2, 0.1, 0.0]}
             for e in (0, 1, 2) * 3]  # fmt: skip
    rows = cache_sim_rows(tmp_path / "trace.jsonl", steps)
    assert float(rows["LRU"][1]) == 0.0
    assert float(rows["learned"][1]) == pytest.approx(2 / 9, abs=1e-3)
    trace = RoutingTrace.load(tmp_path / "trace.jsonl")
    assert trace.expected_by_layer()[0][0] == [1.0, 0.2, 0.1, 0.0]


def test_a_traces_hit_rate_is_the_learned_policys_where_it_holds_scores():
    trace = RoutingTrace({"moe_layers": [0, 1]})
    for e in (0, 1, 2) * 3:  # 0, 1, 2 in turn thrash LRU's 2 slots
        trace.record(0, [e], 1, [1.0, 0.2, 0.1, 0.0])  # scores that keep 0
        trace.record(1, [e], 1)
    assert trace.lru_hit_rate(2) == 0.0
    # layer 0 keeps expert 0 by its scores (2 hits of 9), layer 1 has none: LRU's (0 of 9)
    assert trace.hit_rate([2, 2]) == pytest.approx(2 / 18)
