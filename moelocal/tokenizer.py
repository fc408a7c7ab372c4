"""Tokenizer (tokenizer.json through the `tokenizers` library) and the chat template, rendered in
a sandboxed jinja2 environment: a template can format text, never touch files or Python objects."""

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import MoelocalError


def token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise MoelocalError(f"{model_dir}: no tokenizer.json; pass token ids instead of text")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise MoelocalError(f"{path}: cannot read tokenizer ({e})") from None
        config_path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise MoelocalError(f"{config_path}: invalid JSON ({e})") from None
        self.bos_token = token_text(config.get("bos_token"))
        self.eos_token = token_text(config.get("eos_token"))
        self.special_tokens = {
            name: token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(name) is not None
        }
        self.chat_template = self._chat_template(model_dir, config.get("chat_template"))

    @staticmethod
    def _chat_template(model_dir: Path, template) -> str | None:
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template}
            return named.get("default") or next(iter(named.values()), None)
        return template

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: from invalid UTF-8 or a JSON escape
            raise MoelocalError(f"the text is not valid Unicode (character {e.start + 1} is "
                                f"{text[e.start]!r})") from None  # fmt: skip
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def decoder(self):
        """Incremental decoding, one id at a time: step(id) -> the text it adds, or None while a
        character is incomplete. Its pieces add up to decode() of the ids fed."""
        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(self.hf, token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise MoelocalError("this tokenizer has no chat template")
        try:
            template = chat_environment().from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except TemplateError as e:
            raise MoelocalError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template writes the special tokens itself (as transformers does)
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def raise_exception(message):
    raise TemplateError(message)


def chat_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
