"""Throughput of `moelocal serve` with 1, 2, 4 and 8 concurrent clients: total tokens/s, time to
first token (p50, p95) and expert bytes moved per generated token, which fall as concurrency
rises because one expert load serves the whole batch.

    python scripts/serve_bench.py                                    # the default model
    python scripts/serve_bench.py cache/models/mixtral-medium-int4 --cache-experts 2

Each round sends `--requests` streamed completions from N client threads at once (greedy, a
different prompt each, `--max-tokens` each) to a server started in this process on a free port.
"""

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

import moelocal
from moelocal.serve import Server

PROMPTS = ["The sea", "A fool and his money", "Never trust", "Love is", "In the beginning",
           "The best way to", "Every cloud", "Time flies"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens generated) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = client.completions.create(model="m", prompt=prompt, temperature=0,
                                       max_tokens=max_tokens, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--cache-experts", type=int)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()
    engine = moelocal.load(args.model, device="cpu", cache_experts=args.cache_experts)
    port = free_port()
    server = Server(lambda: engine, "m", max_batch=8)
    server.start()
    http = uvicorn.Server(uvicorn.Config(server.app(), port=port, log_level="warning"))
    threading.Thread(target=http.run, daemon=True).start()
    while server.engine is None or not http.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    one(client, "warm up", 8)
    cache = engine.expert_cache
    print(f"{'clients':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} {'KiB/token':>10}")
    for n in [int(c) for c in args.concurrency.split(",")]:
        before = cache.stats.copy() if cache else None
        start = time.perf_counter()
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda p: one(client, p, args.max_tokens), prompts))
        seconds = time.perf_counter() - start
        tokens = sum(t for _, t in results)
        ttft = sorted(f for f, _ in results)
        moved = 0
        if cache is not None:
            moved = cache.stats.since(before).as_dict(cache.expert_bytes)["bytes_moved"]
        p95 = ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]
        print(f"{n:>7} {tokens / seconds:>8.1f} {statistics.median(ttft) * 1e3:>7.0f}ms "
              f"{p95 * 1e3:>7.0f}ms {moved / max(tokens, 1) / 1024:>10.1f}")  # fmt: skip
    http.should_exit = True
    engine.close()


if __name__ == "__main__":
    main()
