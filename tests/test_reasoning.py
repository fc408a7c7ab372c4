"""A reasoning model's reasoning apart from its answer: <think> blocks and gpt-oss's harmony
channels, token by token; carried in its own field by generate --json and batch records, shown
by chat only with --show-reasoning and never kept in its history."""

import json
import shutil

import pytest
from tokenizers import AddedToken
from typer.testing import CliRunner

import moelocal
import moelocal.engine
from moelocal.cli import app
from moelocal.engine import ReplyText
from moelocal.synthetic import make_tokenizer
from moelocal.tokenizer import Tokenizer

runner = CliRunner()
HARMONY = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]


def tokenizer_with(tmp_path, tokens: list[str], special: bool) -> Tokenizer:
    tok = make_tokenizer(400)
    tok.add_tokens([AddedToken(t, special=special) for t in tokens])
    tok.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer(tmp_path)


def reply(tok: Tokenizer, prompt: str, generated: str, stop=None) -> tuple[str, str, str]:
    """(answer, reasoning, streamed answer) of a reply whose ids are those of `generated`."""
    streamed = []
    text = ReplyText(tok, tok.encode(prompt, add_special_tokens=False), stop, streamed.append)
    for token in tok.encode(generated, add_special_tokens=False):
        if text.feed(token):
            break
    return *text.finish(), "".join(streamed)


@pytest.mark.parametrize("prompt, generated", [
    ("user: hi\nassistant:", "<think>\nfirst this, then that\n</think>\n\nthe answer"),
    ("user: hi\nassistant:<think>\n", "first this, then that\n</think>\n\nthe answer"),
])  # fmt: skip
def test_think_blocks_are_reasoning_whether_the_model_or_the_template_opens_them(
    tmp_path, prompt, generated
):
    tok = tokenizer_with(tmp_path, ["<think>", "</think>"], special=False)
    answer, reasoning, streamed = reply(tok, prompt, generated)
    assert (answer, reasoning, streamed) == ("the answer", "first this, then that", "the answer")
    # no think block at all: all answer; a stop string ends the answer only
    assert reply(tok, "user: hi", "plain words here", stop=["here"])[:2] == ("plain words ", "")


def test_harmony_channels_split_analysis_from_final(tmp_path):
    tok = tokenizer_with(tmp_path, HARMONY, special=True)
    generated = ("<|channel|>analysis<|message|>We should greet.<|end|><|start|>assistant"
                 "<|channel|>final<|message|>Hello there!<|return|>")  # fmt: skip
    answer, reasoning, streamed = reply(tok, "<|start|>user<|message|>hi<|end|><|start|>assistant",
                                        generated)  # fmt: skip
    assert (answer, reasoning, streamed) == ("Hello there!", "We should greet.", "Hello there!")
    # a commentary channel is reasoning too; a message with no channel is the answer
    generated = ("<|channel|>commentary to=tool<|message|>call it<|call|>"
                 "<|start|>assistant<|message|>done<|return|>")  # fmt: skip
    assert reply(tok, "<|start|>assistant", generated)[:2] == ("done", "call it")


def test_a_tokenizer_without_reasoning_markup_leaves_the_text_as_it_was(tmp_path):
    tok = tokenizer_with(tmp_path, [], special=False)
    assert reply(tok, "hi", "  spaced <think> words")[:2] == ("  spaced <think> words", "")


@pytest.fixture
def thinking_model(tmp_path, random_model, monkeypatch):
    """The random model with <think> and </think> in its tokenizer, and a decoder that writes
    a think block and an answer (its random weights would not)."""
    path = tmp_path / "thinking"
    shutil.copytree(random_model, path)
    tok = Tokenizer(path)
    tok.hf.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>")])
    tok.hf.save(str(path / "tokenizer.json"))
    script = Tokenizer(path).encode("<think>\nLet me see.\n</think>\n\nFour.", False) + [2]

    def fake_generate(model, requests, *, stop_ids, stats, finished, kv=None):
        for token in script[: requests[0].max_new_tokens]:
            yield [token for _ in requests]

    monkeypatch.setattr(moelocal.engine, "generate", fake_generate)
    return path


def test_generate_json_and_batch_records_carry_the_reasoning_apart(thinking_model, tmp_path):
    result = runner.invoke(app, ["generate", str(thinking_model), "-p", "2+2?", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["text"], out["reasoning"]) == ("Four.", "Let me see.")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": 1, "prompt": "2+2?"}\n')
    result = runner.invoke(app, ["generate", str(thinking_model), "-i", str(prompts), "-o",
                                 str(tmp_path / "out.jsonl")])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert (record["text"], record["reasoning"]) == ("Four.", "Let me see.")


@pytest.mark.parametrize("show", [False, True])
def test_chat_shows_reasoning_only_when_asked_and_keeps_only_the_answer(thinking_model, show):
    from moelocal.chat import Chat

    engine = moelocal.load(thinking_model, device="cpu")
    chat = Chat(engine, show_reasoning=show, max_new_tokens=64, temperature=0.0)
    with chat.console.capture() as shown:
        chat.reply("2+2?")
    assert "Four." in shown.get() and ("Let me see." in shown.get()) == show
    assert chat.session.history[-1] == {"role": "assistant", "content": "Four."}
