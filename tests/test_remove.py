"""`moelocal rm`: removes what moelocal made or downloaded, asks first, and nothing else."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from moelocal.cli import app
from moelocal.convert import convert

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    return tmp_path / "home" / "models"


def test_a_converted_model_is_removed_after_yes(home, tiny):
    out = convert(str(tiny("mixtral")[0]), "int8", home / "mine-int8")
    asked = runner.invoke(app, ["rm", "mine-int8"])  # not a terminal and no --yes: refused
    assert asked.exit_code == 1 and "--yes" in asked.stderr and out.exists()
    done = runner.invoke(app, ["rm", "mine-int8", "--yes"])
    assert done.exit_code == 0, done.output
    assert not out.exists() and "removed" in done.stdout


@pytest.mark.parametrize("case", ["project", "checkpoint", "outside", "with notes"])
def test_anything_else_is_refused_and_kept(home, tiny, tmp_path, case):
    src = tiny("mixtral")[0]
    if case == "project":  # a directory of the user's in the data directory
        target = home / "project"
        target.mkdir()
        (target / "main.py").write_text("keep")
    elif case == "checkpoint":  # a Hugging Face checkpoint copied there by the user
        target = home / "hf"
        shutil.copytree(src, target)
    elif case == "outside":  # a converted model outside the data directory, by path
        target = convert(str(src), "int8", tmp_path / "elsewhere")
    else:
        target = convert(str(src), "int8", home / "noted")
        (target / "notes.md").write_text("keep")
    before = sorted(p.name for p in target.iterdir())
    result = runner.invoke(app, ["rm", str(target) if case == "outside" else target.name, "-y"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in target.iterdir()) == before


def test_a_download_is_removed_from_the_hub_cache(home, tiny, tmp_path):
    repo = tmp_path / "hub" / "models--acme--tiny"
    commit = "0" * 40
    shutil.copytree(tiny("mixtral")[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    listed = runner.invoke(app, ["list", "--json"])
    assert "acme/tiny" in [r["name"] for r in json.loads(listed.stdout)]
    result = runner.invoke(app, ["rm", "acme/tiny", "--yes"])
    assert result.exit_code == 0, result.output
    assert not (repo / "snapshots" / commit).exists()
    missing = runner.invoke(app, ["rm", "acme/other", "--yes"])
    assert missing.exit_code == 1 and "no model acme/other" in missing.stderr
