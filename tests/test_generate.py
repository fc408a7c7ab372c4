"""Generation through the API and the CLI: default model, streaming, stop strings, EOS, hub ids."""

import json
import shutil

import pytest
import torch
from tiny import VOCAB
from typer.testing import CliRunner

import moelocal
from moelocal.cli import app
from moelocal.synthetic import make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def default_engine():
    return moelocal.load()


def test_generate_default_model_json():
    result = runner.invoke(app, ["generate", "--prompt", "Hello", "-n", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert isinstance(out["text"], str) and out["text"]
    assert out["prompt_token_ids"][0] == 1 and 1 <= len(out["token_ids"]) <= 8
    assert out["stats"]["generated_tokens"] == len(out["token_ids"])
    # the trained default model may end its reply (EOS) within 8 tokens
    ended = out["token_ids"][-1] == 2
    assert out["finish_reason"] == ("stop" if ended else "length")
    assert ended or len(out["token_ids"]) == 8
    assert out["stats"]["decode_tokens_per_s"] > 0 and out["stats"]["prefill_tokens_per_s"] > 0


def test_generate_streams_text():
    result = runner.invoke(app, ["generate", "--prompt", "Hello", "-n", "6"])
    assert result.exit_code == 0, result.output
    engine = moelocal.load()
    expected = engine.generate(engine.chat_prompt([{"role": "user", "content": "Hello"}]),
                               max_new_tokens=6).text  # fmt: skip
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr


def test_chat_template_applied_unless_disabled():
    with_template = runner.invoke(app, ["generate", "-p", "Hi", "-n", "1", "--json"])
    raw = runner.invoke(app, ["generate", "-p", "Hi", "-n", "1", "--json", "--no-chat-template"])
    ids_template = json.loads(with_template.stdout)["prompt_token_ids"]
    ids_raw = json.loads(raw.stdout)["prompt_token_ids"]
    engine = moelocal.load()
    assert ids_raw == engine.tokenizer.encode("Hi")
    assert ids_template == engine.tokenizer.encode("<s>[INST] Hi [/INST]", add_special_tokens=False)


def test_synthetic_checkpoints_are_deterministic(tmp_path):
    a = make_checkpoint(tmp_path / "a")
    b = make_checkpoint(tmp_path / "b")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_stream_pieces_make_the_text(default_engine):
    pieces = []
    out = default_engine.generate("The", max_new_tokens=12, stream=pieces.append)
    assert "".join(pieces) == out.text
    assert out.text == default_engine.tokenizer.decode(out.token_ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_text_stream_matches_decoding_the_whole(default_engine, seed):
    """Random ids split UTF-8 characters across tokens (the default tokenizer is byte-level):
    fed one at a time, the streamed pieces make decode() of all the ids, no piece ends in half a
    character, and a stop string cuts where it first appears in the whole text."""
    from moelocal.engine import TextStream

    tokenizer = default_engine.tokenizer
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, default_engine.config.vocab_size, (400,), generator=gen).tolist()
    whole = tokenizer.decode(ids)
    pieces = []
    text = TextStream(tokenizer, None, pieces.append)
    assert not any(text.feed(i) for i in ids)
    assert text.finish(ids) == whole == "".join(pieces)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])
    stop = whole[300:304]
    pieces = []
    text = TextStream(tokenizer, [stop], pieces.append)
    fed = next(n for n, i in enumerate(ids, 1) if text.feed(i))
    assert text.finish(ids[:fed]) == whole[: whole.find(stop)] == "".join(pieces)


def test_the_cpu_kernels_are_built_at_load_not_in_the_first_prompts_time(tiny):
    """A first run compiles the kernels (~30 s): at load, or the first prompt's prefill rate
    said 0.5 tok/s."""
    from moelocal import cpu_kernels

    cpu_kernels.isa.cache_clear()
    engine = moelocal.load(tiny("mixtral")[0], device="cpu")
    assert engine.plan.quant == "none" and cpu_kernels.isa.cache_info().currsize == 1
    engine.close()


def test_long_prompts_prefill_in_chunks(tiny, monkeypatch):
    """Prompts longer than PREFILL_CHUNK go through in several passes over the KV cache: the
    same logits within float32 rounding, the same greedy tokens, batches (each prompt prefilled
    on its own) too."""
    path = tiny("mixtral")[0]
    engine = moelocal.load(path, device="cpu")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (23, 17)]
    whole_logits = engine.logits(prompts[0])
    whole = [g.token_ids for g in engine.generate_batch(prompts, max_new_tokens=8)]
    calls = []
    model_forward = type(engine.model).forward

    def counted(self, tokens, *args, **kwargs):
        calls.append(tokens.shape[1])
        return model_forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(moelocal.generate, "PREFILL_CHUNK", 5)
    monkeypatch.setattr(moelocal.engine, "PREFILL_CHUNK", 5)
    monkeypatch.setattr(type(engine.model), "forward", counted)
    assert torch.allclose(engine.logits(prompts[0]), whole_logits, atol=1e-3)
    assert calls == [5, 5, 5, 5, 3]
    calls.clear()
    assert [g.token_ids for g in engine.generate_batch(prompts, max_new_tokens=8)] == whole
    assert calls[:10] == [5, 5, 5, 5, 3, 5, 5, 5, 2, 1]  # each prompt, then one token a step


def test_stop_string_cuts_the_text(default_engine):
    full = default_engine.generate("The", max_new_tokens=16)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop and stop in full.text
    pieces = []
    out = default_engine.generate("The", max_new_tokens=16, stop=[stop], stream=pieces.append)
    assert out.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == out.text
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_stops_on_eos(tmp_path, tiny):
    import moelocal

    src, _ = tiny("mixtral")
    path = tmp_path / "m"
    shutil.copytree(src, path)
    ids = [5, 6, 7, 8]
    greedy = moelocal.load(path, device="cpu").generate(ids, max_new_tokens=6).token_ids
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [greedy[2], 999]}))
    out = moelocal.load(path, device="cpu").generate(ids, max_new_tokens=6)
    assert out.token_ids == greedy[:3]  # the EOS token is included, as transformers returns it
    assert out.finish_reason == "stop"


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tiny):
    src, _ = tiny("olmoe")
    repo = tmp_path / "hub" / "models--acme--tiny-olmoe"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(app, ["generate", "acme/tiny-olmoe", "-p", "hi", "-n", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["token_ids"]) == 3


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen2_moe", "qwen3_next"])
def test_prompt_cache_reuses_the_shared_prefix(tiny, arch):
    """A chat's next turn prefills only what is new, with the same result as from scratch. A
    model with linear attention keeps its recurrent state only for a prompt that continues all
    the cache holds (a state cannot be cut back), and starts over otherwise."""
    import torch

    engine = moelocal.load(tiny(arch)[0], device="cpu")
    gen = torch.Generator().manual_seed(1)
    cache = engine.new_prompt_cache()
    ids = torch.randint(3, 150, (12,), generator=gen).tolist()
    held = 0  # tokens the cache holds: the prompt and all but the last generated token
    for _ in range(3):  # the KV cache grows past its first allocation on the way
        out = engine.generate(ids, max_new_tokens=6, prompt_cache=cache)
        assert out.token_ids == engine.generate(ids, max_new_tokens=6).token_ids
        assert out.stats.extra["cached_prompt_tokens"] == held
        held = len(ids) + len(out.token_ids) - 1
        ids = ids + out.token_ids + torch.randint(3, 150, (5,), generator=gen).tolist()
    # a different history: only the common prefix is kept
    other = ids[:4] + [7, 7, 7]
    out = engine.generate(other, max_new_tokens=3, prompt_cache=cache)
    assert out.stats.extra["cached_prompt_tokens"] == (0 if arch == "qwen3_next" else 4)
    assert out.token_ids == engine.generate(other, max_new_tokens=3).token_ids


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "phimoe", "minimax_m2"])
def test_a_prompt_continued_in_pieces_gets_a_fresh_prompts_bits(tiny, arch, quant):
    """Prefilled at once, in two pieces (a conversation's next turn over its prompt cache) or
    token by token (decoded), a prompt's last logits are the same bits: on the CPU the int8/int4
    kernels, attention and routers sum in each row's own order at any row count, so the server's
    prompt cache changes no token (with PyTorch's fused attention 4 of 16 turns differed)."""
    import torch

    from moelocal.models.attention import KVCache

    model = moelocal.load(tiny(arch)[0], device="cpu", dtype="bfloat16", quant=quant).model
    T = 70  # more than a vector of keys past the window of gpt-oss' sliding layers
    ids = torch.randint(3, 150, (1, T), generator=torch.Generator().manual_seed(3))

    def last_logits(pieces):
        kv, start = KVCache(model.cfg.num_hidden_layers, T), 0
        with torch.inference_mode():
            for end in pieces:
                logits, start = model(ids[:, start:end], kv), end
        return logits[0, -1]

    fresh = last_logits([T])
    assert torch.equal(last_logits([29, T]), fresh)
    assert torch.equal(last_logits([1, 50, T]), fresh)
    assert torch.equal(last_logits([40, *range(41, T + 1)]), fresh)


@pytest.mark.parametrize(
    "load",
    [{}, {"dtype": "bfloat16"}, {"dtype": "bfloat16", "quant": "int4"}],
    ids=["float32", "bf16", "int4"],
)
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_next", "phimoe"])
def test_a_batch_of_prompts_of_different_lengths_equals_one_at_a_time(tiny, arch, load):
    """A row's tokens are those it gets alone, in bf16 and int4 too, where batched GEMMs and
    attention over left padding would sum in other orders: each prompt is prefilled alone, a
    decode step attends row by row, and products keep rows apart (models.common.project)."""
    import torch

    engine = moelocal.load(tiny(arch)[0], device="cpu", **load)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 150, (n,), generator=gen).tolist() for n in (9, 3, 14)]
    together = engine.generate_batch(prompts, max_new_tokens=8)
    for p, out in zip(prompts, together, strict=True):
        assert out.token_ids == engine.generate(p, max_new_tokens=8).token_ids


def test_a_synthetic_checkpoint_replaces_only_its_own_files(tmp_path):
    from moelocal.errors import MoelocalError

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "notes.md").write_text("keep me")
    with pytest.raises(MoelocalError, match="notes.md"):
        make_checkpoint(project)
    assert (project / "notes.md").read_text() == "keep me"
    made = make_checkpoint(tmp_path / "m")
    assert make_checkpoint(made) == made  # its own files: replaced
