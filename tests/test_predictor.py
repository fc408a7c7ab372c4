"""Fitted guesses of routing (predictor.py, `moelocal calibrate`): of later layers' for the
prefetcher, of a layer's next steps for eviction. A fit finds a map the router (or LRU) does not
know, is kept only where it guesses (or hits) better, is found again by the model it was fitted
for (and its conversion), never by another; tokens never depend on it; a damaged file is set
aside, never used, and a user's file is never overwritten."""

import pytest
import torch
from tiny import ARCHS
from typer.testing import CliRunner

import moelocal
from moelocal import predictor
from moelocal.cli import app
from moelocal.convert import convert
from moelocal.slot_map import simulate

runner = CliRunner()
WORDS = "moon river stone apple cloud green quiet light storm paper wind silver bread".split()


def text(words=1500, seed=0) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (words,), generator=gen).tolist()
    return " ".join(WORDS[i] for i in picks)


def top_overlap(k):
    """judge for fit(): the share of the real top k among the guessed top k + 1."""

    def judge(logits, real):
        guessed, needed = logits.topk(k + 1, -1).indices, real.topk(k, -1).indices
        return float((needed[:, :, None] == guessed[:, None, :]).any(-1).float().mean())

    return judge


def test_fit_finds_a_map_the_router_does_not_know():
    gen = torch.Generator().manual_seed(0)
    n, d, e = 3000, 24, 8
    x = torch.randn(n, d, generator=gen)
    true_w, true_b = torch.randn(e, d, generator=gen), torch.randn(e, generator=gen)
    router_w = true_w + 1.5 * torch.randn(e, d, generator=gen)  # the router: a poor guess
    fitted, router_recall, fitted_recall = predictor.fit(
        x, x @ true_w.t() + true_b, router_w, None, top_overlap(2)
    )
    assert fitted is not None and fitted_recall > router_recall + 0.1
    weight, bias = fitted
    assert torch.allclose(weight, true_w, atol=0.05) and torch.allclose(bias, true_b, atol=0.05)


def test_fit_keeps_the_router_where_it_guesses_as_well():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 16, generator=gen)
    w, b = torch.randn(6, 16, generator=gen), torch.randn(6, generator=gen)
    fitted, router_recall, _ = predictor.fit(x, x @ w.t() + b, w, b, top_overlap(2))
    assert fitted is None and router_recall == 1.0


def test_coming_uses_count_each_experts_next_uses_within_a_passage(monkeypatch):
    monkeypatch.setattr(predictor, "REUSE_HORIZON", 3)
    ids = torch.tensor([[0], [1], [0], [2], [0], [1]])  # top 1, 3 experts
    ends = torch.tensor([4, 4, 4, 4, 6, 6])  # two passages: tokens 0-3, 4-5
    coming, full = predictor.coming_uses(ids, 3, ends)
    d = predictor.REUSE_DECAY
    assert coming[0].tolist() == [d, 1.0, d * d]  # 1 next, 0 the step after, then 2
    assert coming[1].tolist() == [1.0, 0.0, d]
    assert full.tolist() == [True, False, False, False, False, False]


def reuse_judge(steps: list[set[int]], n_experts: int):
    """fit_reuse's judge as calibrate makes it: hits of a slot map at 1/4, 1/2 and 3/4 of the
    experts on the held-out steps, evicting by the scores (or by LRU)."""
    counts = (n_experts // 4, n_experts // 2, 3 * n_experts // 4)
    held = steps[len(steps) - int(len(steps) * predictor.HELD_OUT) :]

    def judge(scores):
        expected, policy = (scores.tolist(), "learned") if scores is not None else (None, "lru")
        hits = sum(simulate(held, n, policy, expected) for n in counts)
        return hits / (sum(map(len, held)) * len(counts))

    return judge


def routing(n: int, n_experts: int, seed: int) -> torch.Tensor:
    """Top-2 routing with locality, which LRU uses: 60% of the tokens pick two of a working set
    of three experts, one of which changes every 5 tokens or so."""
    gen = torch.Generator().manual_seed(seed)
    hot, rows = [0, 1, 2], []
    for _ in range(n):
        if torch.rand(1, generator=gen) < 0.2:
            hot[int(torch.randint(3, (1,), generator=gen))] = int(
                torch.randint(n_experts, (1,), generator=gen))  # fmt: skip
        pool = sorted(set(hot)) if torch.rand(1, generator=gen) < 0.6 else []
        pool = pool if len(pool) >= 2 else list(range(n_experts))
        rows.append([pool[i] for i in torch.randperm(len(pool), generator=gen)[:2].tolist()])
    return torch.tensor(rows)


def test_fit_reuse_learns_a_states_hint_of_the_next_steps_and_keeps_lru_without_one():
    n, E, d = 4000, 8, 12
    ids = routing(n, E, seed=0)
    ends = torch.full((n,), n)
    steps = [set(r) for r in ids.tolist()]
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(n, d, generator=gen)
    hint = noise.clone()  # a state that hints at the coming steps' experts, as hidden states do
    hint[:, :E] += 2 * predictor.coming_uses(ids, E, ends)[0]
    fitted, lru, best = predictor.fit_reuse(hint, ids, ends, E, reuse_judge(steps, E))
    assert fitted is not None and best > lru + 0.02
    weight, bias = fitted
    assert weight.shape == (E, d) and bias.shape == (E,)
    fitted, lru, best = predictor.fit_reuse(noise, ids, ends, E, reuse_judge(steps, E))
    assert fitted is None and best < lru + predictor.MIN_GAIN


def test_fits_files_keep_both_kinds_and_read_those_without_eviction_fits(tmp_path):
    gen = torch.Generator().manual_seed(0)
    maps = {(0, 1): (torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen))}
    reuse = {1: (torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen))}
    path = tmp_path / "fits.safetensors"
    predictor.write(path, predictor.RoutePredictors(maps, reuse), "fp")
    back = predictor.read(path, "fp")
    assert back.maps.keys() == maps.keys() and back.reuse.keys() == reuse.keys()
    assert all(torch.equal(a, b) for a, b in zip(back.reuse[1], reuse[1], strict=True))
    predictor.write(path, predictor.RoutePredictors(maps), "fp")  # as before eviction fits
    assert predictor.read(path, "fp").reuse == {}
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    meta = {"format": predictor.FORMAT, "version": predictor.VERSION, "fingerprint": "fp",
            "pairs": "[[0, 1]]", "reuse": "[1]"}  # fmt: skip
    save_file(tensors, str(path), metadata=meta)  # names an eviction fit it does not hold
    with pytest.raises(ValueError, match="incomplete"):
        predictor.read(path, "fp")


def calibrate(path, tmp_path, *extra):
    (tmp_path / "text.txt").write_text(text())
    return runner.invoke(app, ["calibrate", str(path), "--text", str(tmp_path / "text.txt"),
                               *map(str, extra)])  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fits_are_found_again_used_and_change_no_token(tiny, tmp_path, arch, monkeypatch):
    monkeypatch.setattr(predictor, "MIN_GAIN", -1.0)  # keep every fit: random routers
    monkeypatch.setattr("moelocal.prefetch.PROBE", 1)  # every layer guessed, every step
    monkeypatch.setattr("moelocal.prefetch.MIN_PRECISION", 0)
    path = tiny(arch)[0]
    ids = list(range(3, 23))
    plain = moelocal.load(path, device="cpu", cache_experts=1)
    assert plain.model.route_predictors is None
    tokens = plain.generate(ids, max_new_tokens=10).token_ids

    result = calibrate(path, tmp_path)
    assert result.exit_code == 0, result.output
    stored = predictor.stored_path(predictor.fingerprint(plain.model))
    assert stored.is_file() and str(stored) in result.stdout
    assert "eviction: hit rate" in result.stdout
    engine = moelocal.load(path, device="cpu", cache_experts=1)
    fitted = engine.model.route_predictors
    assert fitted is not None and fitted.maps
    # a MoE layer 0 is guessed from the embedding: its map is fitted too
    assert ((-1, 0) in fitted.maps) == engine.model.cfg.moe_layers[0]
    assert fitted.reuse and engine.expert_cache.reuse.keys() == fitted.reuse.keys()
    calls = []
    gate = fitted.gate
    monkeypatch.setattr(fitted, "gate", lambda s, t: calls.append((s, t)) or gate(s, t))
    out = engine.generate(ids, max_new_tokens=10)
    assert out.token_ids == tokens
    assert calls and out.stats.extra["experts"]["prefetch_issued"] > 0
    stored.unlink()


def test_a_conversion_finds_the_fits_of_its_checkpoint(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(predictor, "MIN_GAIN", -1.0)
    path = tiny("mixtral")[0]
    out = convert(str(path), "int4", tmp_path / "packed")
    assert calibrate(path, tmp_path).exit_code == 0
    engine = moelocal.load(out, device="cpu", cache_experts=1)
    assert engine.model.route_predictors is not None
    predictor.stored_path(predictor.fingerprint(engine.model)).unlink()
    other = moelocal.load(tiny("mixtral", seed=1)[0], device="cpu", cache_experts=1)
    assert predictor.fingerprint(other.model) != predictor.fingerprint(engine.model)


def test_a_damaged_or_foreign_fits_file_is_set_aside(tiny, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(predictor, "MIN_GAIN", -1.0)
    path, other = tiny("mixtral")[0], tiny("mixtral", seed=1)[0]
    ids = list(range(3, 20))
    engine = moelocal.load(path, device="cpu", cache_experts=1)
    tokens = engine.generate(ids, max_new_tokens=8).token_ids
    stored = predictor.stored_path(predictor.fingerprint(engine.model))
    assert calibrate(other, tmp_path, "--out", stored).exit_code == 0  # another model's fits
    good = stored.read_bytes()
    for damage in (good, good[: len(good) // 2], b"\0" * 64):
        stored.write_bytes(damage)
        capfd.readouterr()
        engine = moelocal.load(path, device="cpu", cache_experts=1)
        assert engine.model.route_predictors is None
        assert f"ignoring {stored}" in capfd.readouterr().err
        assert engine.generate(ids, max_new_tokens=8).token_ids == tokens
        assert stored.is_file()  # set aside, not removed: calibrate replaces it
    assert calibrate(path, tmp_path).exit_code == 0
    assert moelocal.load(path, device="cpu", cache_experts=1).model.route_predictors is not None
    stored.unlink()


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_calibrate_refuses_bad_input_in_one_line(tiny, tmp_path):
    path = tiny("mixtral")[0]
    run = lambda *a: runner.invoke(app, ["calibrate", str(path), *map(str, a)])  # noqa: E731
    assert_one_line_error(run("--text", tmp_path / "missing.txt"), "missing.txt")
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfe\x00abc" * 50)
    assert_one_line_error(run("--text", tmp_path / "bytes.txt"), "not UTF-8")
    (tmp_path / "short.txt").write_text("a few words")
    assert_one_line_error(run("--text", tmp_path / "short.txt"), "at least")
    (tmp_path / "text.txt").write_text(text())
    assert_one_line_error(run("--text", tmp_path / "text.txt", "--tokens", 0), "tokens")
    mine = tmp_path / "notes.safetensors"
    mine.write_bytes(b"a user's file")
    assert_one_line_error(run("--text", tmp_path / "text.txt", "--out", mine), "--out")
    assert mine.read_bytes() == b"a user's file"
    assert_one_line_error(run("--text", tmp_path / "text.txt", "--out", tmp_path), "--out")
