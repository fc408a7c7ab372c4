"""OpenAI's API as moelocal serves it: request bodies checked and turned into Jobs (the same
checks as the CLI's, each failure an ApiError with OpenAI's error shape), and responses and
stream chunks shaped as OpenAI's clients read them."""

import time
import uuid

from . import validate
from .engine import Engine, Generation
from .errors import MoelocalError
from .scheduler import Job

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error for the client: HTTP status and OpenAI's {"error": {...}} body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


def check_model(body: dict, served: str):
    name = body.get("model")
    if name is not None and name != served:
        raise ApiError(404, f"model '{name}' is not served here (this server serves '{served}')",
                       "model", code="model_not_found")  # fmt: skip


def message_text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts of which text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}]: only text content is supported", "messages")
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   "messages")  # fmt: skip


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role among "
                                f"{', '.join(ROLES)}", "messages")  # fmt: skip
        out.append({"role": m["role"], "content": message_text(m.get("content") or "", i)})
    return out


def make_job(body: dict, engine: Engine, prompt_ids) -> Job:
    """The sampling fields every endpoint takes, checked; prompt_ids() makes the prompt."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: one completion per request", "n")
    try:
        ids = prompt_ids()
        room = engine.context_length - len(ids)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_new = room if limit is None else validate.whole("max_tokens", limit)
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else temperature
        top_p, seed = body.get("top_p"), body.get("seed")
        validate.sampling(temperature, None, top_p, seed)
        engine.check_context(len(ids), max_new)
    except MoelocalError as e:
        raise ApiError(400, str(e)) from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    top_p = None if top_p in (None, 1) else float(top_p)
    return Job(ids, max_new, float(temperature), top_p, seed, tuple(stop), stream)


def chat_job(body: dict, engine: Engine) -> Job:
    messages = chat_messages(body)
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise ApiError(400, "this model has no chat template: use /v1/completions")
    return make_job(body, engine, lambda: engine.chat_prompt(messages))


def completion_job(body: dict, engine: Engine) -> Job:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    tokens = isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt)  # fmt: skip
    if not isinstance(prompt, str) and not tokens:
        raise ApiError(400, "prompt must be a string, a list of one string, or token ids",
                       "prompt")  # fmt: skip
    unsupported = [name for name in ("echo", "logprobs", "suffix")
                   if body.get(name) is not None and body.get(name) is not False]  # fmt: skip
    if body.get("best_of") not in (None, 1):
        unsupported.append("best_of")
    if unsupported:
        raise ApiError(400, f"{unsupported[0]} is not supported", unsupported[0])
    if tokens and any(not 0 <= t < engine.config.vocab_size for t in prompt):
        raise ApiError(400, f"token ids must be in 0..{engine.config.vocab_size - 1}", "prompt")
    return make_job(body, engine, lambda: engine.encode(prompt))


def finish_reason(out: Generation) -> str:
    return "stop" if out.finish_reason == "stop" else "length"


def usage(out: Generation) -> dict:
    """Token counts; cached_tokens: the prompt's prefix whose KV cache an earlier request left."""
    n, m = len(out.prompt_token_ids), len(out.token_ids)
    cached = out.stats.extra.get("cached_prompt_tokens", 0)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


class Reply:
    """The shapes of one response: a whole one, or the chunks of a stream."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def head(self, chunk: bool = False) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, out: Generation) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": out.text}
            if out.reasoning:
                message["reasoning_content"] = out.reasoning
            choice = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None}
        choice["finish_reason"] = finish_reason(out)
        return self.head() | {"choices": [choice], "usage": usage(out)}

    def chunk(self, text: str | None = None, reasoning: str | None = None, role: bool = False,
              out: Generation | None = None, with_usage: bool = False) -> dict:  # fmt: skip
        """One stream event: a piece of text or reasoning, the role (chat's first chunk), or the
        last one with the finish reason (and usage, when asked for)."""
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if reasoning is not None:
                delta["reasoning_content"] = reasoning
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        choice["finish_reason"] = finish_reason(out) if out is not None else None
        body = self.head(chunk=True) | {"choices": [choice]}
        if with_usage:
            body["usage"] = usage(out) if out is not None else None
        return body
