"""`moelocal serve`, called the way its users call it: with the official openai client (and raw
HTTP for what a client would never send). Greedy replies equal `generate`'s; streams end with
[DONE]; concurrent requests all complete; a client that leaves frees the engine; bad requests get
OpenAI's error shape and status; the key is enforced."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

import moelocal
from moelocal.serve import Server


class Raw:
    """Plain HTTP for what a client library would never send (stdlib: no client of our own)."""

    def __init__(self, status: int, text: str):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def request(method: str, url: str, body: str | dict | None = None, headers=None) -> Raw:
    host, path = url.removeprefix("http://").split("/", 1)
    conn = http.client.HTTPConnection(host, timeout=60)
    data = json.dumps(body) if isinstance(body, dict) else body
    conn.request(method, "/" + path, body=data, headers=headers or {})
    r = conn.getresponse()
    out = Raw(r.status, r.read().decode())
    conn.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server on a free port in a thread, like `moelocal serve`."""

    def __init__(self, load, api_key=None, max_batch=8, name="m"):
        self.port = free_port()
        self.server = Server(load, name, api_key, max_batch)
        self.server.start()
        config = uvicorn.Config(self.server.app(), port=self.port, log_level="warning")
        self.http = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.http.run, daemon=True)
        self.thread.start()
        while not self.http.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self):
        while request("GET", f"{self.url}/health").status_code != 200:
            time.sleep(0.05)
        return self

    def client(self, key="unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def stop(self):
        self.http.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def engine():
    with moelocal.load(None, device="cpu") as e:  # the default model
        yield e


@pytest.fixture(scope="module")
def served(engine):
    running = Running(lambda: engine).wait_ready()
    yield running
    running.stop()


def generate_text(engine, messages=None, prompt=None, n=24):
    ids = engine.chat_prompt(messages) if messages else engine.encode(prompt)
    return engine.generate(ids, max_new_tokens=n)


def test_chat_and_completions_equal_generate_streamed_or_not(served, engine):
    client = served.client()
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    want = generate_text(engine, messages=messages)
    reply = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                           max_tokens=24)  # fmt: skip
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(want.prompt_token_ids), len(want.token_ids))  # fmt: skip
    stream = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text and chunks[-1].usage.completion_tokens == len(want.token_ids)

    want = generate_text(engine, prompt="The sea is", n=12)
    done = client.completions.create(model="m", prompt="The sea is", temperature=0, max_tokens=12)
    assert done.choices[0].text == want.text
    assert done.choices[0].finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    pieces = client.completions.create(model="m", prompt="The sea is", temperature=0,
                                       max_tokens=12, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in pieces) == want.text


def test_a_conversations_next_turn_reuses_its_kv_cache(served, engine):
    client = served.client()
    messages = [{"role": "user", "content": "Say something wise."}]
    first = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                           max_tokens=16)  # fmt: skip
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And another."}]  # fmt: skip
    second = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                            max_tokens=16)  # fmt: skip
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].message.content == generate_text(engine, messages, n=16).text


def test_concurrent_streams_all_complete_as_alone(served, engine):
    prompts = ["A fool", "The wise", "Never", "Love is"]
    want = [generate_text(engine, prompt=p, n=16).text for p in prompts]

    def ask(prompt):
        stream = served.client().completions.create(model="m", prompt=prompt, temperature=0,
                                                    max_tokens=16, stream=True)  # fmt: skip
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == want
    metrics = request("GET", f"{served.url}/metrics").text
    assert "moelocal_requests_total" in metrics and "moelocal_expert_hits_total" in metrics


def test_a_client_that_leaves_frees_the_engine(random_model):
    """A random model's replies run to the limit: a left stream must stop long before it."""
    with moelocal.load(random_model, device="cpu") as engine:
        running = Running(lambda: engine).wait_ready()
        try:
            body = {"prompt": "hello", "max_tokens": 2000, "stream": True, "temperature": 0}
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
            conn.request("POST", "/v1/completions", body=json.dumps(body))
            stream = conn.getresponse()
            assert stream.readline().startswith(b"data: ")  # streaming: now leave
            conn.close()
            reply = running.client().completions.create(model="m", prompt="hi", max_tokens=3)
            assert reply.usage.completion_tokens == 3
            counters = running.server.scheduler.counters
            assert counters.requests == 2 and counters.generated_tokens < 2000
        finally:
            running.stop()


@pytest.mark.parametrize("body, status, param", [
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400, None),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, None),
    ('{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', 400, "messages"),
    ('{"messages": "hi"}', 400, "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}', 404, "model"),
    ('{"messages": [{"role": "user"', 400, None),
    ('[1, 2]', 400, None),
])  # fmt: skip
def test_bad_requests_get_openais_error_shape(served, body, status, param):
    r = request("POST", f"{served.url}/v1/chat/completions", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert request("GET", f"{served.url}/health").status_code == 200  # still serving


def test_bad_completion_prompts_and_unknown_routes(served):
    for body in ({"prompt": 5}, {"prompt": [10**9]}, {"prompt": "x", "echo": True}, {}):
        assert request("POST", f"{served.url}/v1/completions", body).status_code == 400
    r = request("GET", f"{served.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert request("GET", f"{served.url}/v1/completions").status_code == 405


def test_the_key_is_enforced_when_set(engine):
    running = Running(lambda: engine, api_key="s3cret").wait_ready()
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        assert running.client("s3cret").models.list().data[0].id == "m"
        assert request("GET", f"{running.url}/metrics").status_code == 401
        assert request("GET", f"{running.url}/health").status_code == 200  # for load balancers
    finally:
        running.stop()


def test_503_while_the_model_loads(engine):
    release = threading.Event()
    running = Running(lambda: (release.wait(), engine)[1])
    try:
        r = request("POST", f"{running.url}/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert request("GET", f"{running.url}/health").json()["status"] == "loading"
        release.set()
        running.wait_ready()
        assert running.client().completions.create(model="m", prompt="hi", max_tokens=2).choices
    finally:
        running.stop()


def test_the_served_model_is_listed(served):
    data = request("GET", f"{served.url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["m"]


def test_the_cli_says_in_one_line_why_it_cannot_serve(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moelocal.cli", "serve", str(tmp_path / "missing"), "--port",
           str(free_port())]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: model directory not found")
    assert "Traceback" not in result.stderr
