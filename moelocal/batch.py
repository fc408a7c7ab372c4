"""Scripted batch generation: prompts from JSONL in, one JSON line per finished prompt out.

Each result is appended and flushed as soon as its group finishes, so a crash or Ctrl-C loses
nothing already done, and a rerun skips the ids already in the output. A bad input line becomes an
error record (with its line number) and the run goes on. This module knows nothing of terminals:
the CLI passes a callback for progress.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine
from .errors import MoelocalError, reason


@dataclass
class Job:
    line: int
    id: object
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    seed: int | None


def key(record: dict) -> str:
    """What identifies an input line in the output: its id, else its line number."""
    if record.get("id") is not None:
        return json.dumps(record["id"], sort_keys=True)
    return f"line:{record.get('line')}"


def finished_keys(output: Path) -> set[str]:
    """Keys already in the output. A torn last line (a crash mid-write) is cut off."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(output, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    keys = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            keys.add(key(json.loads(line)))
        except (json.JSONDecodeError, AttributeError):
            continue
    return keys


def parse_line(engine: Engine, n: int, line: str, defaults: dict, chat: bool) -> Job:
    """One input line -> a Job, or MoelocalError saying what is wrong with it."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise MoelocalError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise MoelocalError("each line must be a JSON object")
    if item.get("id") is None:
        raise MoelocalError("missing 'id'")
    max_new = item.get("max_new_tokens", defaults["max_new_tokens"])
    temperature = item.get("temperature", defaults["temperature"])
    seed = item.get("seed", defaults["seed"])
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
        raise MoelocalError(f"'max_new_tokens' must be a whole number >= 0, got {max_new!r}")
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or temperature < 0:
        raise MoelocalError(f"'temperature' must be a number >= 0, got {temperature!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise MoelocalError(f"'seed' must be a whole number, got {seed!r}")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise MoelocalError("'messages' must be a list of {role, content} objects")
        ids = engine.chat_prompt(messages)
    elif isinstance(item.get("prompt"), str):
        ids = engine.prompt_ids(item["prompt"], chat)
    else:
        raise MoelocalError("needs a 'prompt' string or a 'messages' list")
    engine.check_context(len(ids), max_new)
    return Job(n, item["id"], ids, max_new, float(temperature), seed)


def read_jobs(engine, lines, skip: set[str], defaults: dict, chat: bool) -> Iterator[Job | dict]:
    """Jobs to run and error records, in input order, leaving out what `skip` holds."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = parse_line(engine, n, line, defaults, chat)
        except MoelocalError as e:
            item_id = None
            try:
                item = json.loads(line)
                item_id = item.get("id") if isinstance(item, dict) else None
            except json.JSONDecodeError:
                pass
            record = {"id": item_id, "line": n, "error": str(e)}
            if key(record) not in skip:
                yield record
            continue
        if key({"id": job.id}) not in skip:
            yield job


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def run_batch(
    engine: Engine,
    lines,
    write: Callable[[dict], None],
    *,
    skip: set[str] = frozenset(),
    batch_size: int = 1,
    defaults: dict,
    chat: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    progress: Callable[[Summary], None] = lambda summary: None,
) -> Summary:
    """Generate for every pending line, `batch_size` prompts decoded together."""
    summary = Summary(skipped=len(skip))
    group: list[Job] = []

    def flush_group():
        outs = engine.generate_batch(
            [j.prompt_ids for j in group], max_new_tokens=[j.max_new_tokens for j in group],
            temperature=[j.temperature for j in group], seed=[j.seed for j in group],
            top_k=top_k, top_p=top_p,
        )  # fmt: skip
        for job, out in zip(group, outs, strict=True):
            write({"id": job.id, "text": out.text, "prompt_tokens": len(out.prompt_token_ids),
                   "generated_tokens": len(out.token_ids), "token_ids": out.token_ids,
                   "finish_reason": out.finish_reason, "timings": timings(out.stats)})  # fmt: skip
            summary.done += 1
            summary.generated_tokens += len(out.token_ids)
        summary.seconds += max(o.stats.prefill_s + o.stats.decode_s for o in outs)
        group.clear()
        progress(summary)

    for item in read_jobs(engine, lines, skip, defaults, chat):
        if isinstance(item, dict):
            write(item)
            summary.failed += 1
            progress(summary)
            continue
        group.append(item)
        if len(group) == batch_size:
            flush_group()
    if group:
        flush_group()
    return summary


def timings(stats) -> dict:
    d = stats.as_dict()
    return {k: d[k] for k in ("time_to_first_token_s", "prefill_s", "decode_s",
                              "prefill_tokens_per_s", "decode_tokens_per_s")}  # fmt: skip


class JsonlWriter:
    """Appends one JSON object per line and flushes it to disk at once."""

    def __init__(self, path: Path | None):
        try:
            self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        except OSError as e:
            raise MoelocalError(f"--output {path}: {reason(e)}") from None

    def __call__(self, record: dict):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self.file is None:
            print(line, end="", flush=True)
            return
        self.file.write(line)  # one write per record: a crash tears at most the last line
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        if self.file:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
