"""A converted model's experts read before torch is imported (preread.py): the cache takes them over
only when they are what its load planned, and the tokens are the same with or without them."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tiny import VOCAB
from typer.testing import CliRunner

import moelocal
from moelocal import preread
from moelocal.cli import app
from moelocal.convert import convert
from moelocal.errors import MoelocalError

runner = CliRunner()


def prompt(n=12, seed=5):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def packed(tiny, tmp_path_factory):
    """A converted tiny Mixtral (int4) and its greedy tokens loaded without a preread."""
    out = convert(str(tiny("mixtral")[0]), "int4", tmp_path_factory.mktemp("preread") / "packed")
    with moelocal.load(out, device="cpu", cpu_mem="64GiB") as plain:  # a budget: no preread
        assert plain.expert_cache.stats.preread_bytes == 0
        return out, plain.generate(prompt(), max_new_tokens=8).token_ids


def copy_of(model: Path, where: Path) -> tuple[Path, dict]:
    """A copy of a converted model (real files: links out of a model directory are refused)
    and its manifest."""
    where.mkdir()
    for f in model.iterdir():
        (where / f.name).write_bytes(f.read_bytes())
    return where, json.loads((where / "moelocal.json").read_text())


def preread_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("moelocal-preread")]


def test_the_module_does_not_import_torch():
    code = "import sys, moelocal.preread; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("slots", [None, 1, 3])
def test_tokens_are_the_same_and_the_rows_past_the_plan_are_released(packed, slots):
    out, tokens = packed
    early = preread.start(out, "cpu")  # every slot, whatever the load then plans
    with moelocal.load(out, device="cpu", cache_experts=slots, preread=early) as engine:
        stats, plan = engine.expert_cache.stats, engine.plan
        assert stats.preread_bytes == plan.device_slots * plan.moe_layers * plan.expert_bytes > 0
        assert not preread_threads() and early.fd == -1 and early.memory == {}
        assert engine.generate(prompt(), max_new_tokens=8).token_ids == tokens


def test_a_load_starts_its_own_preread_where_the_plan_is_known(packed):
    out, tokens = packed
    for options, used in (({}, True), ({"cache_experts": 2}, True), ({"cpu_mem": "64GiB"}, False)):
        with moelocal.load(out, device="cpu", **options) as engine:
            assert (engine.expert_cache.stats.preread_bytes > 0) == used, options
            assert engine.generate(prompt(), max_new_tokens=8).token_ids == tokens


def test_a_preread_of_something_else_is_not_taken(packed, tiny, tmp_path):
    """The loader is the judge: another model's experts, a preread with fewer rows than the
    plan's slots, or one already used, are closed and read anew by the cache."""
    out, tokens = packed
    other = convert(str(tiny("mixtral", seed=1)[0]), "int4", tmp_path / "other")
    for model, rows, options in ((other, None, {}), (out, 1, {"cache_experts": 2})):
        early = preread.start(model, "cpu", cache_experts=rows)
        with moelocal.load(out, device="cpu", preread=early, **options) as engine:
            assert engine.expert_cache.stats.preread_bytes == 0
            assert engine.generate(prompt(), max_new_tokens=8).token_ids == tokens
        assert early.fd == -1 and early.memory == {} and not preread_threads()
    used = preread.start(out, "cpu")
    moelocal.load(out, device="cpu", preread=used).close()
    with moelocal.load(out, device="cpu", preread=used) as engine:  # served once: read anew
        assert engine.expert_cache.stats.preread_bytes == 0
        assert engine.generate(prompt(), max_new_tokens=8).token_ids == tokens


def test_a_flipped_byte_is_read_again_and_named(packed, tmp_path):
    """A blob whose checksum fails in the preread is read again by the cache's reader, whose
    error names the expert; the experts the preread read well are still taken."""
    out, _ = packed
    damaged, manifest = copy_of(out, tmp_path / "damaged")
    data = bytearray((damaged / "experts.bin").read_bytes())
    data[manifest["experts"]["1.2"]["offset"] + 7] ^= 0x10
    (damaged / "experts.bin").write_bytes(bytes(data))
    early = preread.start(damaged, "cpu")
    with pytest.raises(MoelocalError, match="expert 2 of layer 1 fails its checksum"):
        moelocal.load(damaged, device="cpu", preread=early)
    assert not preread_threads() and early.fd == -1
    result = runner.invoke(
        app, ["generate", str(damaged), "--device", "cpu", "-p", "hi", "-n", "2"]
    )
    assert result.exit_code == 1 and "expert 2 of layer 1 fails its checksum" in result.stderr


def test_a_manifest_naming_an_expert_config_json_lacks_is_not_taken(packed, tmp_path):
    """An entry far past the config's experts (a damaged or foreign manifest) neither stalls the
    preread (only the manifest's entries are read) nor is taken: the loader reads anew."""
    out, tokens = packed
    odd, manifest = copy_of(out, tmp_path / "odd")
    manifest["experts"]["0.100000000"] = manifest["experts"]["0.0"]
    (odd / "moelocal.json").write_text(json.dumps(manifest))
    with moelocal.load(odd, device="cpu") as engine:
        assert engine.expert_cache.stats.preread_bytes == 0
        assert engine.generate(prompt(), max_new_tokens=8).token_ids == tokens
    assert not preread_threads()


def test_a_failed_load_leaves_no_reads_behind(packed):
    out, _ = packed
    early = preread.start(out, "cpu")
    with pytest.raises(MoelocalError, match="converted for"):
        moelocal.load(out, device="cpu", quant="int8", preread=early)
    assert early.fd == -1 and early.memory == {} and not preread_threads()


def test_where_it_does_not_start(packed, tiny, tmp_path):
    out, _ = packed
    assert preread.start(out, "cuda") is None
    assert preread.start(out, "cpu", cpu_mem="2GiB") is None  # the plan depends on sizes
    assert preread.start(out, "cpu", cache_experts=0) is None
    assert preread.start(tiny("mixtral")[0], "cpu") is None  # not converted
    assert preread.start(tmp_path / "missing", "cpu") is None
    assert preread.start(None, "cpu") is None  # the embedded default model
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "moelocal.json").write_text('{"experts": {"0.0": {"offset": "x"}}}')
    assert preread.start(broken, "cpu") is None  # the load reports it
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in out.iterdir():
        (partial / f.name).symlink_to(f)
    (partial / "moelocal.partial").touch()
    assert preread.start(partial, "cpu") is None


def test_it_does_not_start_where_the_experts_would_not_fit_the_memory_free(packed, monkeypatch):
    out, _ = packed
    started = preread.start(out, "cpu")
    assert started is not None
    started.close()
    monkeypatch.setattr("moelocal.memory_room.available", lambda: preread.TORCH_ROOM)
    assert preread.start(out, "cpu") is None


def test_the_cli_reads_early_and_gives_the_same_tokens(packed, monkeypatch):
    out, tokens = packed
    started, kept = [], []
    original = preread.start

    def spy(*args, **kwargs):
        early = original(*args, **kwargs)
        keep = early.keep
        early.keep = lambda *a: kept.append(keep(*a)) or kept[-1]
        started.append(args[0])
        return early

    monkeypatch.setattr(preread, "start", spy)
    result = runner.invoke(app, ["generate", str(out), "--device", "cpu", "--no-chat-template",
                                 "-p", "hello there", "-n", "6", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert started == [str(out)] and kept == [True]  # started by the CLI (not load) and taken
    with moelocal.load(out, device="cpu", cpu_mem="64GiB") as engine:
        ids = engine.prompt_ids("hello there", chat_template=False)
        assert (
            json.loads(result.stdout)["token_ids"]
            == engine.generate(ids, max_new_tokens=6).token_ids
        )
