"""Bad input gets one clear line on stderr and exit code 1, from the CLI and as MoelocalError."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moelocal.cli import app

runner = CliRunner()


def run_generate(*args):
    return runner.invoke(app, ["generate", *map(str, args), "--prompt", "hi", "-n", "2"])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def model_copy(tmp_path, tiny):
    """A fresh copy of a tiny sharded checkpoint to break."""
    from tiny import save_tiny

    path = tmp_path / "model"
    save_tiny(path, "mixtral", max_shard_size="100KB")
    return path


def test_missing_directory(tmp_path):
    assert_one_line_error(run_generate(tmp_path / "nope"), "not found", "nope")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    assert_one_line_error(run_generate(model_copy), "no config.json")


def test_invalid_config(model_copy):
    (model_copy / "config.json").write_text("{ not json")
    assert_one_line_error(run_generate(model_copy), "config.json", "invalid JSON")


def test_unsupported_model_type(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    assert_one_line_error(
        run_generate(model_copy), "'llama'", "mixtral", "qwen3_moe", "deepseek_v3"
    )


def test_missing_shard(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_one_line_error(run_generate(model_copy), shard.name, "missing")


def test_truncated_safetensors(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_generate(model_copy), shard.name, "truncated or corrupt")


def test_corrupt_safetensors_header(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_generate(model_copy), shard.name)


def test_pickle_only_weights(model_copy):
    for f in model_copy.glob("*.safetensors*"):
        f.unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_one_line_error(run_generate(model_copy), "pickle", "safetensors")


def test_tensor_missing_from_checkpoint(model_copy):
    from safetensors.torch import load_file, save_file

    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped], index["weight_map"][dropped]
    save_file(tensors, shard)
    index_path.write_text(json.dumps(index))
    assert_one_line_error(run_generate(model_copy), dropped)


def test_unknown_tensor_in_checkpoint(model_copy):
    from safetensors.torch import load_file, save_file

    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensors = load_file(shard)
    tensors["model.layers.0.mystery.weight"] = tensors[sorted(tensors)[0]].clone()
    index["weight_map"]["model.layers.0.mystery.weight"] = shard.name
    save_file(tensors, shard)
    index_path.write_text(json.dumps(index))
    assert_one_line_error(run_generate(model_copy), "model.layers.0.mystery.weight")


def test_prompt_longer_than_context(tiny):
    path, ref = tiny("qwen3_moe")
    long_prompt = "word " * (ref.config.max_position_embeddings + 5)
    result = runner.invoke(app, ["generate", str(path), "--prompt", long_prompt, "-n", "4"])
    assert_one_line_error(
        result, "exceeds the model's context", str(ref.config.max_position_embeddings)
    )


def test_max_new_tokens_past_context(tiny):
    path, ref = tiny("qwen3_moe")
    n = ref.config.max_position_embeddings
    result = runner.invoke(app, ["generate", str(path), "--prompt", "hi", "-n", str(n)])
    assert_one_line_error(result, "exceeds the model's context")


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert_one_line_error(run_generate("someone/not-here"), "moelocal pull someone/not-here")


def test_real_process_exit_code_and_single_line(tmp_path):
    """The installed console script, as a user runs it."""
    exe = shutil.which("moelocal", path=os.path.dirname(sys.executable)) or "moelocal"
    proc = subprocess.run(
        [exe, "generate", str(tmp_path / "missing"), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
    assert proc.stdout == ""
