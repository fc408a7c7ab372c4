"""tokenizer.json through `tokenizers`, chat templates in a sandbox."""

import json

import pytest

from moelocal.errors import MoelocalError
from moelocal.synthetic import CHAT_TEMPLATE, make_tokenizer
from moelocal.tokenizer import Tokenizer


@pytest.fixture
def tok_dir(tmp_path):
    make_tokenizer(400).save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_round_trip_and_bos(tok_dir):
    tok = Tokenizer(tok_dir)
    ids = tok.encode("héllo wörld")
    assert ids[0] == 1  # the post-processor adds <s>
    assert tok.decode(ids) == "héllo wörld"
    assert tok.eos_token_id == 2


def test_chat_template_renders_messages(tok_dir):
    tok = Tokenizer(tok_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<s>[SYS] be brief [/SYS][INST] hi [/INST]"
    ids = tok.encode_chat(messages)
    assert ids.count(1) == 1  # the template's <s>, not a second one from the post-processor


def test_chat_template_jinja_file_wins(tok_dir):
    (tok_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{% endfor %}"
    )
    assert Tokenizer(tok_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "<user>"


def test_template_is_sandboxed(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(MoelocalError, match="chat template"):
        Tokenizer(tok_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception(tok_dir):
    (tok_dir / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(MoelocalError, match="roles must alternate"):
        Tokenizer(tok_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(MoelocalError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**10 }}",
    "{{ [1] * 10**10 }}",
    "{{ 2 ** 100000000 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 1 / 0 }}",
    "{{ messages[5].content }}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ messages | unknown_filter }}",
])  # fmt: skip
def test_a_hostile_or_broken_template_is_bounded_and_one_error(tok_dir, template):
    import time

    (tok_dir / "chat_template.jinja").write_text(template)
    start = time.time()
    with pytest.raises(MoelocalError, match="chat template"):
        Tokenizer(tok_dir).apply_chat_template([{"role": "user", "content": "x"}])
    assert time.time() - start < 30


@pytest.mark.parametrize("value", [5, [1, 2], [{"name": "default"}], {"a": "b"}])
def test_chat_template_of_a_wrong_type_is_one_error(tok_dir, value):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": value}))
    with pytest.raises(MoelocalError, match="chat_template"):
        Tokenizer(tok_dir)
