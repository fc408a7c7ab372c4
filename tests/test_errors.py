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


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/../../outside.safetensors"])  # fmt: skip
def test_shard_names_outside_the_model_are_refused(model_copy, shard):
    """Weights from elsewhere never load, whatever the index names."""
    shutil.copy(
        sorted(model_copy.glob("model-*.safetensors"))[0], model_copy.parent / "outside.safetensors"
    )
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    assert_one_line_error(run_generate(model_copy), repr(shard))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model-00001-of-"])
def test_a_link_to_a_file_outside_the_model_is_refused(model_copy, tmp_path, name):
    target = next(p for p in sorted(model_copy.iterdir()) if p.name.startswith(name))
    outside = tmp_path / "elsewhere" / target.name
    outside.parent.mkdir()
    shutil.move(target, outside)
    target.symlink_to(outside)
    assert_one_line_error(run_generate(model_copy), "outside the model directory")


def test_a_hub_snapshot_with_links_into_its_blobs_loads(model_copy, tmp_path):
    """In a Hugging Face cache the snapshot's files are links into the repository's blobs/."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(model_copy.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    result = run_generate(snapshot)
    assert result.exit_code == 0, result.output


def test_a_fifo_in_place_of_a_weights_file_does_not_hang(model_copy):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    assert_one_line_error(run_generate(model_copy), shard.name, "not a regular file")


@pytest.mark.parametrize("file, content, fragment", [
    ("model.safetensors.index.json", '{"weight_map": [1, 2]}', "weight_map"),
    ("model.safetensors.index.json", '{"weight_map": {"a": 3}}', "weight_map"),
    ("tokenizer_config.json", '["not", "an", "object"]', "JSON object"),
    ("generation_config.json", '{"eos_token_id": "two"}', "eos_token_id"),
    ("generation_config.json", '[]', "generation_config.json"),
    ("tokenizer_config.json", '{"bos_token": 5}', "bos_token"),
    ("tokenizer_config.json", '{"eos_token": {"x": 1}, "pad_token": ["a"]}', "pad_token"),
    ("config.json", '[' * 50000 + ']' * 50000, "invalid JSON"),
])  # fmt: skip
def test_wrong_json_shapes_in_model_files_are_one_line(model_copy, file, content, fragment):
    (model_copy / file).write_text(content)
    assert_one_line_error(run_generate(model_copy), fragment)


def test_control_characters_from_model_files_never_reach_the_terminal(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    evil = "\x1b]0;pwned\x07\x1b[2J\nsecond line"
    (model_copy / "config.json").write_text(json.dumps(config | {"model_type": evil}))
    result = run_generate(model_copy)
    assert_one_line_error(result, "\\x1b")
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr


def test_list_shows_a_broken_model_and_the_rest(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("MOELOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    shutil.copytree(tiny("mixtral")[0], models / "good")
    shutil.copytree(tiny("mixtral")[0], models / "broken")
    (models / "broken" / "moelocal.json").write_text("{ torn")
    shutil.copytree(tiny("mixtral")[0], models / ".good.install-1")  # work in progress: hidden
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"good", "broken"}
    assert rows["good"]["architecture"] == "mixtral" and "broken" not in rows["good"]
    assert rows["broken"]["broken"]
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "broken" in table.stdout and "good" in table.stdout


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", 1_000_000_000), ("num_hidden_layers", 0), ("hidden_size", -64),
    ("num_attention_heads", 0), ("num_local_experts", 0.5), ("num_experts_per_tok", 7),
    ("num_experts_per_tok", 0), ("rms_norm_eps", float("nan")), ("dtype", "int7"),
    ("vocab_size", "many"), ("num_key_value_heads", 3), ("intermediate_size", [1]),
    ("sliding_window", "big"), ("sliding_window", -4), ("eos_token_id", "x"),
])  # fmt: skip
def test_config_values_out_of_range_name_the_field(model_copy, field, value):
    """Checked when config.json is read, by generate and by plan (which allocates nothing)."""
    config = json.loads((model_copy / "config.json").read_text())
    config.pop("torch_dtype", None)
    (model_copy / "config.json").write_text(json.dumps(config | {field: value}))
    assert_one_line_error(run_generate(model_copy), "config.json")
    planned = runner.invoke(app, ["plan", str(model_copy)])
    assert_one_line_error(planned, "config.json")


@pytest.mark.parametrize("args, fragment", [
    (["bench", "--cache-experts", "2,,4"], "empty item"),
    (["bench", "--cache-experts", "2,-1"], "--cache-experts"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--quant", "int4,q3"], "--quant"),
    (["bench", "--cpu-mem", "1GiB,lots"], "lots"),
    (["bench", "--cache-policy", "lru,mru"], "--cache-policy"),
    (["plan", "--hit-rate", "-3"], "--hit-rate"),
    (["plan", "--hit-rate", "nan"], "--hit-rate"),
    (["generate", "-p", "hi", "--device", "tpu:x"], "device"),
    (["generate", "-p", "hi", "--device", "mps"], "device"),
    (["generate", "-p", "hi", "--threads", "100000"], "--threads"),
    (["chat", "-n", "-3"], "--max-new-tokens"),
    (["generate", "-p", "hi", "-n", "-3"], "--max-new-tokens"),
])  # fmt: skip
def test_cli_values_out_of_range_are_one_line_before_any_work(args, fragment):
    assert_one_line_error(runner.invoke(app, args), fragment)


@pytest.mark.parametrize("extra", [
    "model.layers.0.block_sparse_moe.experts.99.w1.weight",
    "model.layers.77.block_sparse_moe.experts.0.w1.weight",
])  # fmt: skip
def test_expert_tensors_beyond_the_config_are_an_error(model_copy, extra):
    from safetensors.torch import load_file, save_file

    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensors = load_file(shard)
    tensors[extra] = tensors[sorted(tensors)[0]].clone()
    index["weight_map"][extra] = shard.name
    save_file(tensors, shard)
    index_path.write_text(json.dumps(index))
    assert_one_line_error(run_generate(model_copy), extra)


def test_a_resident_shape_mismatch_names_the_tensor_and_both_shapes(model_copy):
    from safetensors.torch import load_file, save_file

    index = json.loads((model_copy / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = model_copy / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].clone()
    save_file(tensors, shard)
    assert_one_line_error(run_generate(model_copy), key, "(64, 63)", "(64, 64)")


@pytest.mark.parametrize("delay", [0.2, 0.3, 0.5, 1.0])
def test_ctrl_c_during_start_up_ends_the_command(random_model, delay):
    """Ctrl-C while torch is being imported, the model loaded or tokens generated: exit 130 and
    one line, never a traceback, and never ignored (torch's import swallowed it at some points)."""
    import signal
    import time

    cmd = [sys.executable, "-m", "moelocal.cli", "generate", str(random_model), "-p", "hi",
           "-n", "4000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    # 130 from moelocal; a signal death only if it came before Python's own handler was set
    assert proc.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr and stderr.count("\n") <= 1, stderr
