"""`moelocal serve`: an OpenAI-compatible HTTP server over one loaded engine (Starlette routes
served by uvicorn). The model loads in the background: until it has, requests get 503. Every
request but /health needs `Authorization: Bearer KEY` when a key is set; errors have OpenAI's
JSON shape and never stop the server.
"""

import asyncio
import hmac
import json
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import MoelocalError
from .openai_api import ApiError, Reply, chat_job, check_model, completion_job, usage
from .scheduler import Scheduler, Ticket


class Server:
    """The engine being loaded or served, and the routes over it."""

    def __init__(self, load, model_name: str, api_key: str | None = None, max_batch: int = 8):
        self.model_name, self.api_key, self.max_batch = model_name, api_key, max_batch
        self.engine = self.scheduler = None
        self.load_error: str | None = None
        self.started = time.time()
        self.load = load

    def start(self, on_load_error=lambda: None):
        """Load the model in the background; on_load_error() if that fails (the CLI stops
        listening then)."""
        threading.Thread(target=self._load, args=(on_load_error,), name="moelocal-load",
                         daemon=True).start()  # fmt: skip

    def _load(self, on_load_error):
        try:
            engine = self.load()
            self.scheduler = Scheduler(engine, self.max_batch)
            self.engine = engine
        except (MoelocalError, OSError) as e:
            self.load_error = str(e)
            on_load_error()

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/health", self.health),
            Route("/metrics", self.guarded(self.metrics)),
            Route("/v1/models", self.guarded(self.models)),
            Route("/v1/chat/completions", self.guarded(self.chat), methods=["POST"]),
            Route("/v1/completions", self.guarded(self.completions), methods=["POST"]),
        ], exception_handlers={404: not_found, 405: not_allowed})  # fmt: skip

    def guarded(self, handler):
        """handler behind the API key, with ApiErrors (and anything unexpected) as responses."""

        async def route(request: Request) -> Response:
            try:
                self.check_key(request)
                return await handler(request)
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except Exception as e:  # noqa: BLE001 -- one bad request never stops the server
                error = ApiError(500, f"internal error: {e}", kind="server_error")
                return JSONResponse(error.body(), status_code=500)

        return route

    def check_key(self, request: Request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")  # fmt: skip

    def ready(self):
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", kind="server_error")
        if self.engine is None:
            raise ApiError(503, "the model is loading", kind="server_error")

    async def health(self, request: Request) -> Response:
        try:
            self.ready()
        except ApiError as e:
            return JSONResponse({"status": "loading" if self.load_error is None else "error",
                                 "error": e.message}, status_code=503)  # fmt: skip
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(self.started),
            "owned_by": "moelocal"}]})  # fmt: skip

    async def chat(self, request: Request) -> Response:
        return await self.complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, chat=False)

    async def complete(self, request: Request, chat: bool) -> Response:
        body = await json_body(request)
        check_model(body, self.model_name)
        self.ready()
        job = (chat_job if chat else completion_job)(body, self.engine)
        reply = Reply(chat, self.model_name)
        ticket = self.scheduler.submit(job)
        if job.stream:
            options = body.get("stream_options") or {}
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            return StreamingResponse(events(ticket, reply, with_usage),
                                     media_type="text/event-stream")  # fmt: skip
        out = await result(ticket, request)
        return JSONResponse(reply.whole(out))

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(prometheus(self), media_type="text/plain; version=0.0.4")


async def json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def result(ticket: Ticket, request: Request):
    """The finished generation; the job is cancelled if the client goes away meanwhile."""
    while True:
        try:
            kind, value = await asyncio.wait_for(ticket.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                ticket.cancel()
                raise ApiError(499, "the client went away") from None
            continue
        if kind == "done":
            return value
        if kind == "error":
            raise ApiError(400, value)


async def events(ticket: Ticket, reply: Reply, with_usage: bool):
    """Server-sent events of a streamed reply, ending with [DONE]; a client that goes away
    cancels its job (the generator is closed)."""

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if reply.chat:
            yield sse(reply.chunk(role=True, text=""))
        while True:
            kind, value = await ticket.events.get()
            if kind == "text":
                yield sse(reply.chunk(text=value))
            elif kind == "reasoning" and reply.chat:
                yield sse(reply.chunk(reasoning=value))
            elif kind == "error":
                yield sse(ApiError(400, value).body())
                break
            elif kind == "done":
                yield sse(reply.chunk(out=value, text=None if reply.chat else ""))
                if with_usage:
                    yield sse(reply.head(chunk=True) | {"choices": [], "usage": usage(value)})
                break
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a no-op once done; ends the row when the client left mid-stream


async def not_found(request: Request, exc) -> Response:
    error = ApiError(404, f"no route {request.url.path}", code="not_found")
    return JSONResponse(error.body(), status_code=404)


async def not_allowed(request: Request, exc) -> Response:
    error = ApiError(405, f"{request.method} is not allowed on {request.url.path}")
    return JSONResponse(error.body(), status_code=405)


def prometheus(server: Server) -> str:
    """Request, token and expert-cache totals in Prometheus' text format."""
    lines = []

    def metric(name: str, kind: str, value, help_text: str):
        lines.extend([f"# HELP moelocal_{name} {help_text}", f"# TYPE moelocal_{name} {kind}",
                      f"moelocal_{name} {value}"])  # fmt: skip

    metric("up", "gauge", int(server.engine is not None), "1 once the model is loaded")
    if server.scheduler is None:
        return "\n".join(lines) + "\n"
    with server.scheduler.lock:
        c = server.scheduler.counters
        counts = dict(vars(c))
    metric("requests_total", "counter", counts["requests"], "requests completed")
    metric("batches_total", "counter", counts["batches"], "decode batches run")
    metric("batched_requests_total", "counter", counts["batched_requests"],
           "requests decoded together with others")  # fmt: skip
    metric("prompt_tokens_total", "counter", counts["prompt_tokens"], "prompt tokens read")
    metric("generated_tokens_total", "counter", counts["generated_tokens"], "tokens generated")
    metric("generation_seconds_total", "counter", round(counts["decode_s"], 6),
           "seconds spent prefilling and decoding")  # fmt: skip
    rate = counts["generated_tokens"] / counts["decode_s"] if counts["decode_s"] else 0.0
    metric("tokens_per_second", "gauge", round(rate, 3), "generated tokens per busy second")
    cache = server.engine.expert_cache
    if cache is not None:
        s = cache.stats.total().summary(cache.expert_bytes)
        for name, help_text in (("hits", "needed experts found in the cache"),
                                ("misses", "needed experts loaded on demand"),
                                ("prefetch_issued", "experts prefetched"),
                                ("prefetch_used", "prefetched experts then needed"),
                                ("bytes_moved", "expert bytes moved between tiers")):  # fmt: skip
            metric(f"expert_{name}_total", "counter", s[name], help_text)
        metric("expert_stall_seconds_total", "counter", s["stall_s"], "time waiting for experts")
        metric("expert_prefetch_precision", "gauge", s["prefetch_precision"],
               "share of prefetched experts that were needed")  # fmt: skip
        metric("expert_prefetch_recall", "gauge", s["prefetch_recall"],
               "share of needed experts that were predicted")  # fmt: skip
    return "\n".join(lines) + "\n"
