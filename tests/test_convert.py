"""`moelocal convert`: the packed model gives what quantizing on load gives, every blob is
checked on read, and an interrupted convert never looks like a model."""

import json
import shutil

import pytest
import torch
from tiny import ARCHS, VOCAB
from typer.testing import CliRunner

import moelocal
import moelocal.store
from moelocal.cli import app
from moelocal.convert import convert
from moelocal.errors import MoelocalError

runner = CliRunner()


def prompt(n=14, seed=3):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_converted_equals_quantized_on_load(tiny, tmp_path, arch, quant):
    src = tiny(arch)[0]
    out = convert(str(src), quant, tmp_path / "packed")
    manifest = json.loads((out / "moelocal.json").read_text())
    assert manifest["quant"] == quant and all(e["offset"] % 4096 == 0
                                              for e in manifest["experts"].values())  # fmt: skip
    ids = prompt()
    on_load = moelocal.load(src, device="cpu", quant=quant)
    packed = moelocal.load(out, device="cpu")
    assert packed.plan.quant == quant
    assert torch.equal(packed.logits(ids), on_load.logits(ids))
    tokens = on_load.generate(ids, max_new_tokens=8).token_ids
    assert packed.generate(ids, max_new_tokens=8).token_ids == tokens
    streamed = moelocal.load(out, device="cpu", cache_experts=1)
    assert streamed.generate(ids, max_new_tokens=8).token_ids == tokens


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_a_conversion_in_another_format_is_refused_never_misread(tiny, tmp_path, quant):
    """Format 1 stored int8/int4 in torch's packed layouts: such a model is refused with a line
    saying to convert again (its plain and nf4 blobs are the same in both formats and load), and
    so is a format this moelocal does not know."""
    out = convert(str(tiny("mixtral")[0]), quant, tmp_path / "packed")
    manifest = json.loads((out / "moelocal.json").read_text())
    assert manifest["format"] == 3 and manifest["resident"] == "compute"
    for version, refused in ((1, quant != "none"), (4, True), ("3", True)):
        (out / "moelocal.json").write_text(json.dumps(manifest | {"format": version}))
        if not refused:
            assert moelocal.load(out, device="cpu").plan.quant == quant
            continue
        with pytest.raises(MoelocalError, match="another moelocal version.*convert again"):
            moelocal.load(out, device="cpu")
        result = runner.invoke(app, ["generate", str(out), "-p", "hi", "-n", "2"])
        assert result.exit_code == 1 and "convert again" in result.stderr


def test_cli_convert_into_the_data_directory(tiny):
    result = runner.invoke(app, ["convert", str(tiny("olmoe")[0]), "--quant", "int8"])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["list", "--json"])
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    name = f"{tiny('olmoe')[0].name}-int8"
    assert rows[name]["quantization"] == "int8"
    ran = runner.invoke(app, ["generate", name, "-p", "hi", "-n", "3", "--json"])
    assert ran.exit_code == 0 and len(json.loads(ran.stdout)["token_ids"]) == 3


def test_a_flipped_byte_is_caught_naming_the_expert(tiny, tmp_path):
    out = convert(str(tiny("mixtral")[0]), "int4", tmp_path / "packed")
    manifest = json.loads((out / "moelocal.json").read_text())
    target = manifest["experts"]["1.3"]["offset"] + 100
    data = bytearray((out / "experts.bin").read_bytes())
    data[target] ^= 0x01
    (out / "experts.bin").write_bytes(bytes(data))
    result = runner.invoke(app, ["generate", str(out), "-p", "hi", "-n", "2"])
    assert result.exit_code == 1
    assert "expert 3 of layer 1 fails its checksum" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    # streaming finds it too, on the read that brings the expert in
    engine = moelocal.load(out, device="cpu", cache_experts=1)
    with pytest.raises(MoelocalError, match="fails its checksum"):
        for seed in range(20):
            engine.generate(prompt(seed=seed), max_new_tokens=4)


def test_an_interrupted_convert_is_detected(tiny, tmp_path):
    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny("mixtral")[0]), "int8", out, progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no leftovers
    # a convert killed outright leaves its marked temporary directory: never a model
    killed = tmp_path / ".packed.tmp-999999999"
    killed.mkdir()
    (killed / "moelocal.partial").touch()
    with pytest.raises(MoelocalError, match="interrupted"):
        moelocal.load(killed, device="cpu")
    # the next convert to the same place succeeds and removes it
    assert convert(str(tiny("mixtral")[0]), "int8", out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["packed"]


def test_convert_replaces_only_a_converted_model(tiny, tmp_path):
    src = tiny("mixtral")[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (mine, src):  # someone's files, or the checkpoint itself
        with pytest.raises(MoelocalError, match="not a converted model"):
            convert(str(src), "int8", out)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (src / "config.json").exists()
    # an earlier conversion is replaced, here by one with another quantization
    out = convert(str(src), "int8", tmp_path / "packed")
    convert(str(src), "int4", out)
    assert moelocal.load(out, device="cpu").plan.quant == "int4"


@pytest.mark.parametrize("mark", ["{}", "partial", "valid manifest"])
def test_a_project_with_a_moelocal_file_is_never_replaced(tiny, tmp_path, mark):
    """Only a directory that is provably an earlier conversion (a manifest that reads as one, and
    nothing convert would not write) is replaced; a stray moelocal.json or moelocal.partial in
    someone's project does not make it one."""
    src = tiny("mixtral")[0]
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (project / "main.py").write_text("print('keep me')")
    if mark == "partial":
        (project / "moelocal.partial").touch()
    elif mark == "{}":
        (project / "moelocal.json").write_text("{}")
    else:
        packed = convert(str(src), "int8", tmp_path / "packed")
        shutil.copy(packed / "moelocal.json", project / "moelocal.json")
    result = runner.invoke(app, ["convert", str(src), "--quant", "int8", "--out", str(project)])
    assert result.exit_code == 1 and "not a converted model" in result.stderr
    assert (project / "main.py").read_text() == "print('keep me')"
    assert (project / ".git" / "HEAD").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["project"] + (["packed"] if mark == "valid manifest" else [])
    )


def test_a_converted_model_with_a_user_file_added_is_kept(tiny, tmp_path):
    src = tiny("mixtral")[0]
    out = convert(str(src), "int8", tmp_path / "packed")
    (out / "my-notes.md").write_text("keep me")
    with pytest.raises(MoelocalError, match="my-notes.md"):
        convert(str(src), "int4", out)
    assert (out / "my-notes.md").read_text() == "keep me"


def test_out_as_a_symlink_is_refused_leaving_nothing(tiny, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    result = runner.invoke(app, ["convert", str(tiny("mixtral")[0]), "--out", str(link)])
    assert result.exit_code == 1 and "symbolic link" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    assert not any(target.iterdir())


def test_an_output_that_cannot_be_written_is_one_line(tiny, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "packed"  # its parent is a file: no directory can be made there
    result = runner.invoke(app, ["convert", str(tiny("mixtral")[0]), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: --out {out}: not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_truncated_experts_file(tiny, tmp_path):
    out = convert(str(tiny("mixtral")[0]), "int8", tmp_path / "packed")
    data = (out / "experts.bin").read_bytes()
    (out / "experts.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoelocalError, match="truncated"):
        moelocal.load(out, device="cpu")


def test_converted_model_keeps_its_quantization(tiny, tmp_path):
    out = convert(str(tiny("mixtral")[0]), "int4", tmp_path / "packed")
    with pytest.raises(MoelocalError, match="converted for"):
        moelocal.load(out, device="cpu", quant="int8")
    with pytest.raises(MoelocalError, match="already a converted model"):
        convert(str(out), "int8", tmp_path / "again")


def test_a_flipped_byte_in_the_resident_file_is_caught(tiny, tmp_path):
    out = convert(str(tiny("mixtral")[0]), "int8", tmp_path / "packed")
    data = bytearray((out / "resident.safetensors").read_bytes())
    data[-50] ^= 0x01  # in a weight, past the header
    (out / "resident.safetensors").write_bytes(bytes(data))
    result = runner.invoke(app, ["generate", str(out), "-p", "hi", "-n", "2"])
    assert result.exit_code == 1 and "fails its checksum" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_convert_checks_free_space_before_writing(tiny, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    result = runner.invoke(app, ["convert", str(tiny("mixtral")[0]), "--out",
                                 str(tmp_path / "packed")])  # fmt: skip
    assert result.exit_code == 1 and "GB are free" in result.stderr and "needs" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_format_2_conversion_still_loads_the_same(tiny, tmp_path, quant):
    """Format 2 stored the checkpoint's resident weights, quantized at every load; format 3
    stores them as they compute. Both give the tokens of quantizing on load."""
    from safetensors.torch import load_file, save_file

    src = tiny("mixtral")[0]
    out = convert(str(src), quant, tmp_path / "packed")
    resident = load_file(out / "resident.safetensors")
    assert any(name.endswith("qkv_proj.q") for name in resident)  # stored quantized, fused
    engine = moelocal.load(src, device="cpu", quant=quant)
    ids = prompt()
    expected = engine.generate(ids, max_new_tokens=8).token_ids
    assert moelocal.load(out, device="cpu").generate(ids, max_new_tokens=8).token_ids == expected
    old = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()
           if ".experts." not in k}  # fmt: skip
    save_file(old, out / "resident.safetensors")
    manifest = json.loads((out / "moelocal.json").read_text())
    del manifest["resident"], manifest["resident_crc32"]
    (out / "moelocal.json").write_text(json.dumps(manifest | {"format": 2}))
    assert moelocal.load(out, device="cpu").generate(ids, max_new_tokens=8).token_ids == expected


@pytest.mark.parametrize("change", [
    {"experts": [1, 2]}, {"experts": {"0.0": {"offset": "x", "crc32": 1}}},
    {"experts": {"0.0": 5}}, {"dtype": "int7"}, {"expert_bytes": -5}, {"resident_crc32": "zz"},
])  # fmt: skip
def test_a_manifest_of_wrong_types_is_one_line(tiny, tmp_path, change):
    out = convert(str(tiny("mixtral")[0]), "int8", tmp_path / "packed")
    manifest = json.loads((out / "moelocal.json").read_text())
    (out / "moelocal.json").write_text(json.dumps(manifest | change))
    result = runner.invoke(app, ["generate", str(out), "-p", "hi", "-n", "2"])
    assert result.exit_code == 1 and "invalid manifest" in result.stderr, result.output
    assert result.stderr.strip().count("\n") == 0


def test_the_checksum_is_zlibs_crc32_whichever_library_computes_it():
    """Converted models store zlib's CRC32; ISA-L's computes it 7x faster, the same numbers (a
    checkpoint converted with either loads with the other)."""
    import os
    import zlib

    from moelocal.crc import crc32

    data = os.urandom(3 * 4096 + 17)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[100:], crc32(data[:100])) == zlib.crc32(data)
    assert crc32(b"") == 0


def test_each_expert_is_checked_at_its_first_read_only(tiny, tmp_path, monkeypatch):
    out = convert(str(tiny("mixtral")[0]), "int4", tmp_path / "packed")
    checked = []
    real_crc32 = moelocal.store.crc32
    monkeypatch.setattr(moelocal.store, "crc32", lambda b: checked.append(len(b)) or real_crc32(b))
    engine = moelocal.load(out, device="cpu", cache_experts=1, prefetch=False)
    reads = len(checked)  # the slots' first fill
    engine.generate(prompt(), max_new_tokens=8)
    misses = engine.expert_cache.stats.total().misses
    n_experts = engine.plan.n_experts * engine.plan.moe_layers
    assert misses > n_experts  # experts were read again
    assert len(checked) == len(engine.expert_cache.mover.reader.verified) <= n_experts
    assert reads <= len(checked)
