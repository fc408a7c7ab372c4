"""`moelocal bench`, `pull` and `list`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moelocal.cli import app

runner = CliRunner()


def test_bench_json_on_the_default_model():
    # 48 decoded tokens: the trained default model decodes ~350 tok/s, and a run of a few dozen
    # milliseconds makes the mean of per-run rates and the total-time floor drift apart
    result = runner.invoke(app, ["bench", "-p", "48", "-n", "48", "-r", "2", "--cache-experts",
                                 "2,8", "--prefetch", "on,off", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["cache_experts"], r["prefetch"]) for r in rows] == [
        (2, True),
        (2, False),
        (8, True),
        (8, False),
    ]
    for r in rows:
        assert r["prompt_tokens"] == 48 and r["gen_tokens"] == 48
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["prefill_tok_s_std"] >= 0 and r["decode_tok_s_std"] >= 0
        assert 0 <= r["hit_rate"] <= 1 and 0 <= r["stall_share"] <= 1
        assert 0 <= r["prefetch_precision"] <= 1 and 0 <= r["prefetch_recall"] <= 1
        assert r["peak_rss_bytes"] > 0 and r["floor_tok_s"] > 0
    streamed, resident = rows[0], rows[2]
    assert streamed["bytes_moved_per_token"] > 0 and streamed["hit_rate"] < 1
    assert resident["hit_rate"] == 1 and resident["bytes_moved_per_token"] == 0
    assert resident["stall_share"] == 0
    # all resident, the floor is the compute time: nothing runs faster than it (the floor comes
    # from total times, the speed is a mean of per-run rates: a little slack between the two)
    assert resident["floor_tok_s"] >= resident["decode_tok_s"] * 0.9
    assert rows[1]["prefetch_precision"] == 0 and rows[1]["prefetch_recall"] == 0


def test_bench_table_and_csv():
    table = runner.invoke(app, ["bench", "-p", "16", "-n", "4", "-r", "1"])
    assert table.exit_code == 0 and "tg tok/s" in table.stdout and "pp16 tg4" in table.stdout
    csv = runner.invoke(app, ["bench", "-p", "16", "-n", "4", "-r", "1", "--csv"])
    header, row = csv.stdout.splitlines()[:2]
    assert "decode_tok_s" in header.split(",") and len(row.split(",")) == len(header.split(","))


@pytest.mark.parametrize("bad", [["--prefetch", "maybe"], ["--prefetch-depth", "1,0"],
                                 ["--prefetch-depth", "two"]])  # fmt: skip
def test_bench_bad_sweep_is_one_line(bad):
    result = runner.invoke(app, ["bench", *bad])
    assert result.exit_code == 1 and result.stderr.startswith("error:")
    assert result.stderr.count("\n") == 1


def test_bench_sweeps_the_prefetch_depth():
    result = runner.invoke(app, ["bench", "-p", "8", "-n", "8", "-r", "1", "--cache-experts", "2",
                                 "--prefetch-depth", "1,3", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["prefetch_depth"] for r in rows] == [1, 3]
    assert all(r["hit_rate"] < 1 for r in rows)


def test_bench_sweeps_threads_and_reports_the_kernel_path():
    import torch

    from moelocal import cpu_kernels

    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["bench", "-p", "8", "-n", "3", "-r", "1", "--quant", "int4",
                                     "--threads", "1,2", "--json"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["threads"] for r in rows] == [1, 2]
    assert all(r["kernel"] == cpu_kernels.path() and r["quant"] == "int4" for r in rows)
    bad = runner.invoke(app, ["bench", "--threads", "two"])
    assert bad.exit_code == 1 and "--threads 'two'" in bad.stderr


def hub_cache(tmp_path, src, repo="acme/tiny-moe"):
    """A Hugging Face cache holding `repo` at refs/main, as huggingface_hub lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir()
    return tmp_path / "hub"


@pytest.fixture
def offline_env(tmp_path, tiny):
    cache = hub_cache(tmp_path, tiny("deepseek_v3")[0])
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               MOELOCAL_HOME=str(tmp_path / "home"))  # fmt: skip
    return env


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "moelocal.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_pull_from_the_local_cache_offline(offline_env):
    proc = cli(offline_env, "pull", "acme/tiny-moe")
    assert proc.returncode == 0, proc.stderr
    assert "acme/tiny-moe" in proc.stdout and "snapshots" in proc.stdout
    generated = cli(offline_env, "generate", "acme/tiny-moe", "-p", "hi", "-n", "2", "--json")
    assert generated.returncode == 0 and len(json.loads(generated.stdout)["token_ids"]) == 2


def test_pull_of_a_missing_repo_is_one_line(offline_env):
    proc = cli(offline_env, "pull", "acme/not-there")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "acme/not-there" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    bad = cli(offline_env, "pull", "not a repo id!")
    assert bad.returncode == 1 and "not a hub repository id" in bad.stderr


def test_list_shows_hub_and_converted_models(offline_env, tmp_path, tiny):
    shutil.copytree(tiny("mixtral")[0], tmp_path / "home" / "models" / "mine")
    (tmp_path / "home" / "models" / "broken").mkdir(parents=True)
    proc = cli(offline_env, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"acme/tiny-moe", "mine"}
    assert rows["acme/tiny-moe"]["architecture"] == "deepseek_v3"
    assert rows["acme/tiny-moe"]["experts"] == 8 and rows["acme/tiny-moe"]["source"] == "hf cache"
    assert rows["mine"]["experts"] == 6 and rows["mine"]["size_bytes"] > 0
    table = cli(offline_env, "list")
    assert "acme/tiny-moe" in table.stdout and "deepseek_v3" in table.stdout


def test_each_bench_row_peaks_on_its_own():
    """A sweep's rows share a process: a row's peak RAM must not be an earlier row's."""
    from moelocal.engine import peak_rss_bytes, reset_peak_memory

    big = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB, touched
    del big
    before = peak_rss_bytes()
    assert reset_peak_memory()
    assert peak_rss_bytes() < before - 200 * 2**20


def test_pull_fetches_top_level_files_that_fit(tmp_path, monkeypatch):
    """Online, pull asks the hub for the file list: only top-level files moelocal reads are
    fetched (not an original/ copy of the weights), and only if the disk has room."""
    from collections import namedtuple

    import huggingface_hub

    from moelocal import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sibling = namedtuple("sibling", "rfilename size")
    files = [("config.json", 1000), ("model-00001-of-00002.safetensors", 4 * 10**9),
             ("model-00002-of-00002.safetensors", 3 * 10**9), ("tokenizer.json", 10**6),
             ("original/consolidated.safetensors", 7 * 10**9), ("README.md", 100),
             ("pytorch_model.bin", 7 * 10**9)]  # fmt: skip
    info = namedtuple("info", "siblings")([sibling(*f) for f in files])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: info)
    asked = {}

    def fake_download(repo_id, allow_patterns, **kwargs):
        asked["patterns"] = allow_patterns
        snapshot = tmp_path / "snap"
        snapshot.mkdir(exist_ok=True)
        (snapshot / "config.json").write_text("{}")
        (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**13, 0, 8 * 10**9))
    hub.pull("acme/big-moe")
    assert asked["patterns"] == ["config.json", "model-00001-of-00002.safetensors",
                                 "model-00002-of-00002.safetensors", "tokenizer.json"]  # fmt: skip
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**13, 0, 6 * 10**9))
    asked.clear()
    result = runner.invoke(app, ["pull", "acme/big-moe"])
    assert result.exit_code == 1 and "needs 7.00 GB" in result.stderr and not asked


def test_help_and_list_do_not_import_torch():
    """`moelocal --help` answers at once; `list` reads configs (a model put there by the test is
    listed) and `pull` asks the cache, all without torch or the model code."""
    code = "\n".join([
        "import sys",
        "from typer.testing import CliRunner",
        "from moelocal.cli import app",
        "for args in (['--help'], ['generate', '--help'], ['rm', '--help'], ['list', '--json']):",
        "    result = CliRunner().invoke(app, args)",
        "    assert result.exit_code == 0, result.output",
        "print(result.stdout)",
        "assert 'not in the local cache' in CliRunner().invoke(app, ['pull', 'acme/none']).stderr",
        "print(sorted(m for m in sys.modules if m in ('torch', 'moelocal.models.common')))",
    ])  # fmt: skip
    from moelocal.hub import data_dir

    models = data_dir() / "models"
    shutil.copytree(Path(__file__).parent.parent / "moelocal" / "data" / "default",
                    models / "listed", dirs_exist_ok=True)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed, imported = proc.stdout.strip().rsplit("\n", 1)
    assert "listed" in [r["name"] for r in json.loads(listed)]
    assert imported == "[]"
    shutil.rmtree(models / "listed")
