"""One engine, many requests: a worker thread decodes the requests waiting when it starts a batch
together (up to max_batch), so that each expert it loads serves all of them; later arrivals wait
for the next batch. Results and text pieces go back to each request's asyncio queue.

Requests decode together only where the engine's batch allows (the same top_p and stop strings;
max_new_tokens, temperature and seed are per request); others wait for their own batch. A
request's cancel() (its client went away) ends its row at the next step. A lone request uses the
prompt cache, so a conversation's next turn prefills only what is new.
"""

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from .engine import Engine, Generation

# after a request arrives, how long the worker waits for others sent at the same moment (clients
# of one script, a page's several calls) before it starts their batch
GATHER_S = 0.01


@dataclass
class Job:
    """What one API request asks the engine for."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False


@dataclass
class Ticket:
    """A submitted job: its events ("text", piece), ("reasoning", piece), ("done", Generation)
    or ("error", message) arrive on `events` in the server's event loop."""

    job: Job
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def put(self, kind: str, value):  # from the worker thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self):
        self.cancelled = True


@dataclass
class Counters:
    """Totals for /metrics."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0
    batches: int = 0
    batched_requests: int = 0


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8):
        self.engine, self.max_batch = engine, max_batch
        self.waiting: queue.Queue[Ticket | None] = queue.Queue()
        self.counters = Counters()
        self.lock = threading.Lock()  # counters are read by /metrics while the worker writes
        self.prompt_cache = engine.new_prompt_cache()
        self.worker = threading.Thread(target=self._run, name="moelocal-decode", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> Ticket:
        ticket = Ticket(job, asyncio.get_running_loop())
        self.waiting.put(ticket)
        return ticket

    def close(self):
        self.waiting.put(None)
        self.worker.join()

    def _run(self):
        while (first := self.waiting.get()) is not None:
            batch, until = [first], time.monotonic() + GATHER_S
            while len(batch) < self.max_batch:
                try:
                    nxt = self.waiting.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:  # closing: finish this batch first
                    self.waiting.put(None)
                    break
                batch.append(nxt)
            batch = [t for t in batch if not t.cancelled]
            key = lambda t: (t.job.top_p is None, t.job.top_p or 0, t.job.stop)  # noqa: E731
            for _, group in itertools.groupby(sorted(batch, key=key), key=key):
                self._decode(list(group))

    def _decode(self, group: list[Ticket]):
        jobs = [t.job for t in group]
        try:
            outs = self.engine.generate_batch(
                [j.prompt_ids for j in jobs], max_new_tokens=[j.max_new_tokens for j in jobs],
                temperature=[j.temperature for j in jobs], seed=[j.seed for j in jobs],
                top_p=jobs[0].top_p, stop=list(jobs[0].stop) or None,
                streams=[lambda p, t=t: t.put("text", p) for t in group],
                reasoning_streams=[lambda p, t=t: t.put("reasoning", p) for t in group],
                cancelled=[lambda t=t: t.cancelled for t in group],
                prompt_cache=self.prompt_cache if len(group) == 1 else None,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- a failed batch fails its requests, not the server
            for t in group:
                t.put("error", str(e))
            return
        self._count(group, outs)
        for t, out in zip(group, outs, strict=True):
            t.put("done", out)

    def _count(self, group: list[Ticket], outs: list[Generation]):
        with self.lock:
            c = self.counters
            c.requests += len(group)
            c.batches += 1
            c.batched_requests += len(group) if len(group) > 1 else 0
            c.prompt_tokens += sum(len(o.prompt_token_ids) for o in outs)
            c.generated_tokens += sum(len(o.token_ids) for o in outs)
            c.decode_s += max(o.stats.prefill_s + o.stats.decode_s for o in outs)
