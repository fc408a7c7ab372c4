"""Tokenizer (tokenizer.json through the `tokenizers` library) and the chat template of a model
(rendered by chat_template.py)."""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .chat_template import render
from .errors import MoelocalError
from .model_files import model_file


def token_text(value, name: str) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise MoelocalError(f"tokenizer_config.json: {name} must be a string or "
                            f"{{\"content\": string}}, got {value!r}")  # fmt: skip
    return text


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_file(model_dir, "tokenizer.json")
        if path is None:
            raise MoelocalError(f"{model_dir}: no tokenizer.json; pass token ids instead of text")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise MoelocalError(f"{path}: cannot read tokenizer ({e})") from None
        config_path = model_file(model_dir, "tokenizer_config.json")
        try:
            config = json.loads(config_path.read_text()) if config_path else {}
        except (ValueError, RecursionError) as e:
            raise MoelocalError(f"{config_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise MoelocalError(f"{config_path}: expected a JSON object")
        self.bos_token = token_text(config.get("bos_token"), "bos_token")
        self.eos_token = token_text(config.get("eos_token"), "eos_token")
        self.special_tokens = {
            name: token_text(config.get(name), name)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(name) is not None
        }
        self.chat_template = self._chat_template(model_dir, config.get("chat_template"))

    @staticmethod
    def _chat_template(model_dir: Path, template) -> str | None:
        jinja_file = model_file(model_dir, "chat_template.jinja")
        if jinja_file is not None:
            return jinja_file.read_text()
        if isinstance(template, list):  # named templates: take "default"
            if not all(
                isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
            ):
                raise MoelocalError(f"{model_dir}: chat_template must be a string or a list of "
                                    "{name, template} objects")  # fmt: skip
            named = {t.get("name"): t["template"] for t in template}
            return named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise MoelocalError(f"{model_dir}: chat_template must be a string, got {template!r}")
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
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt)
        return render(self.chat_template, **variables, **self.special_tokens)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template writes the special tokens itself (as transformers does)
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def encode_prompt(self, prompt: str, chat_template: bool = True) -> list[int]:
        """A user prompt's ids: wrapped in the chat template where there is one and
        chat_template is set (as mlx-lm does), else tokenized as is."""
        if chat_template and self.chat_template:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.encode(prompt)
