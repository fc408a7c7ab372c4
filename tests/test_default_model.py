"""The embedded default model: trained, shipped checksummed, installed on first use, and never run
from a damaged copy; a user's files where it would go are refused, never removed."""

import json
import shutil

import pytest
import torch
import transformers

import moelocal
from moelocal import embedded_model
from moelocal.errors import MoelocalError
from moelocal.hub import default_model_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A data directory of this test's own."""
    monkeypatch.setenv("MOELOCAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models" / "default"


def flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_installed_copy_is_the_shipped_one(home):
    path = default_model_dir()
    assert path == home
    sums = embedded_model.checksums()
    assert {"model.safetensors", "config.json", "tokenizer.json", "NOTICE"} <= set(sums)
    assert embedded_model.damaged(path, sums) == []
    assert "BSD" in (path / "NOTICE").read_text()


def test_a_damaged_copy_is_installed_again(home, capsys):
    path = default_model_dir()
    flip_byte(path / "model.safetensors")
    (path / "tokenizer.json").unlink()
    assert default_model_dir() == path
    assert embedded_model.damaged(path, embedded_model.checksums()) == []
    note = capsys.readouterr().err
    assert "model.safetensors" in note and "tokenizer.json" in note
    assert not list(path.parent.glob(".default.*"))  # no temporary left behind


def test_an_older_default_model_is_replaced(home):
    """The random-weight default of earlier versions had the same file names."""
    from moelocal.synthetic import make_checkpoint

    make_checkpoint(home)
    default_model_dir()
    assert embedded_model.damaged(home, embedded_model.checksums()) == []


@pytest.mark.parametrize("foreign", ["notes.txt", "subdir/"])
def test_user_files_in_its_place_are_refused_and_kept(home, foreign):
    home.mkdir(parents=True)
    (home / "config.json").write_text("{}")
    target = home / foreign.rstrip("/")
    if foreign.endswith("/"):
        target.mkdir()
        (target / "work.py").write_text("keep me")
    else:
        target.write_text("keep me")
    with pytest.raises(MoelocalError, match="move them away"):
        default_model_dir()
    assert target.exists() and (home / "config.json").read_text() == "{}"


def test_a_file_or_link_in_its_place_is_refused(home, tmp_path):
    home.parent.mkdir(parents=True)
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    home.symlink_to(elsewhere)
    with pytest.raises(MoelocalError, match="not a directory moelocal made"):
        default_model_dir()
    assert (elsewhere / "config.json").read_text() == "{}"


def test_a_damaged_package_is_reported_not_installed(home, tmp_path, monkeypatch):
    source = tmp_path / "package"
    shutil.copytree(embedded_model.SOURCE, source)
    flip_byte(source / "model.safetensors")
    monkeypatch.setattr(embedded_model, "SOURCE", source)
    with pytest.raises(MoelocalError, match="reinstall moelocal"):
        default_model_dir()
    assert not home.exists()
    (source / embedded_model.SUMS).write_text("not json")
    with pytest.raises(MoelocalError, match="reinstall moelocal"):
        default_model_dir()


@pytest.fixture(scope="module")
def engine():
    return moelocal.load(device="cpu", dtype="float32")


@pytest.mark.parametrize("request_text", ["Tell me something about love.", "Hi!", "What is a cat?"])
def test_chat_replies_are_english_and_end_at_eos(engine, request_text):
    prompt = engine.chat_prompt([{"role": "user", "content": request_text}])
    out = engine.generate(prompt, max_new_tokens=300)
    assert out.finish_reason == "stop" and out.token_ids[-1] == engine.tokenizer.eos_token_id
    words = out.text.split()
    assert words and "\ufffd" not in out.text
    letters = sum(c.isascii() and c.isalpha() for c in out.text)
    assert letters >= 0.6 * len(out.text.replace(" ", "")), out.text


def test_greedy_tokens_match_transformers(engine):
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir(), dtype=torch.float32
    ).eval()
    ids = engine.chat_prompt([{"role": "user", "content": "Say something wise."}])
    theirs = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    expected = theirs[0, len(ids) :].tolist()
    assert engine.generate(ids, max_new_tokens=24).token_ids == expected
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0]
    assert (engine.logits(ids) - logits).abs().max().item() <= 1e-4


ENGLISH = (
    "The best way to predict the future is to invent it. A friend in need is a friend indeed. "
    "Never put off until tomorrow what you can do today, because tomorrow you will be busy."
)


def perplexity(engine, text: str) -> float:
    ids = engine.tokenizer.encode(text)
    logits = engine.logits(ids)[:-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp().item()


def test_trained_not_random(engine, tmp_path):
    """English text it never saw is far more likely under it than under random weights of its
    shape, and its training report ships beside it."""
    from moelocal.synthetic import make_checkpoint

    cfg = json.loads((default_model_dir() / "config.json").read_text())
    shape = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_local_experts", "vocab_size")}  # fmt: skip
    random_dir = make_checkpoint(tmp_path / "random", **shape)
    shutil.copy(default_model_dir() / "tokenizer.json", random_dir / "tokenizer.json")
    trained, random = perplexity(engine, ENGLISH), perplexity(moelocal.load(random_dir), ENGLISH)
    assert trained < 0.1 * random and trained < 200, (trained, random)
    report = json.loads((default_model_dir() / "training.json").read_text())
    assert report["best"]["ppl"] < 200
