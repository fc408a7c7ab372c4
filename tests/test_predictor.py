"""Fitted guesses of later layers' routing (predictor.py, `moelocal calibrate`): a fit finds a
map the router does not know, is kept only where it guesses better, is found again by the model
it was fitted for (and its conversion), never by another; tokens never depend on it; a damaged
file is set aside, never used, and a user's file is never overwritten."""

import pytest
import torch
from tiny import ARCHS
from typer.testing import CliRunner

import moelocal
from moelocal import predictor
from moelocal.cli import app
from moelocal.convert import convert

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
    engine = moelocal.load(path, device="cpu", cache_experts=1)
    fitted = engine.model.route_predictors
    assert fitted is not None and fitted.maps
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
