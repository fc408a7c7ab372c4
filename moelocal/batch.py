"""Scripted batch generation: prompts from JSONL in, one JSON line per finished prompt out.

Each result is appended and flushed as soon as its group finishes, so a crash or Ctrl-C loses
nothing already done; a rerun skips the lines that have a result and retries the ones that failed.
A bad input line becomes an error record (with its line number) and the run goes on. This module
knows nothing of terminals: the CLI passes a callback for progress.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import validate
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


def as_record(raw: bytes) -> dict | None:
    """A line of moelocal's output as a record (a result or an error), else None."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(record, dict) and "id" in record and ("text" in record or "error" in record):
        return record
    return None


def resume_output(output: Path) -> set[str]:
    """The keys of the lines that already have a result in `output` (error records do not count:
    those lines run again). Refuses a file that is not moelocal's output. A torn last line (a
    crash mid-write) is cut; a whole record lacking only its newline gets one."""
    if not output.exists():
        return set()
    try:
        data = output.read_bytes()
    except OSError as e:
        raise MoelocalError(f"--output {output}: {reason(e)}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: b"" in a whole file
    records = []
    for n, raw in enumerate(lines, 1):
        record = as_record(raw)
        if record is None and raw.strip():
            raise MoelocalError(f"--output {output}: line {n} is not a moelocal result; give a "
                                "new file, or one that moelocal wrote")  # fmt: skip
        records.append(record)
    if tail:
        record = as_record(tail)
        if record is not None:
            with open(output, "ab") as f:
                f.write(b"\n")
            records.append(record)
        elif tail.startswith(b'{"id": '):  # how every record begins: one cut short
            with open(output, "r+b") as f:
                f.truncate(len(data) - len(tail))
        else:
            raise MoelocalError(f"--output {output}: its last line is not a moelocal result; "
                                "give a new file, or one that moelocal wrote")  # fmt: skip
    return {key(r) for r in records if r is not None and "error" not in r}


def read_lines(data: bytes) -> list[str]:
    """The input's lines. Only \\n ends a line (a JSON string may hold U+2028 and the like);
    bytes that are not UTF-8 become lone surrogates, which that line's parse reports."""
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


@dataclass
class Entry:
    """A non-blank input line: its JSON object, or what is wrong with it."""

    line: int
    item: dict | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return key({"id": self.item.get("id") if self.item else None, "line": self.line})


def parse_item(line: str) -> dict:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MoelocalError(f"not valid UTF-8 (at character {e.start + 1})") from None
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise MoelocalError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise MoelocalError("invalid JSON (nested too deeply)") from None
    if not isinstance(item, dict):
        raise MoelocalError("each line must be a JSON object")
    item_id = item.get("id")
    if item_id is None:
        raise MoelocalError("missing 'id'")
    if not isinstance(item_id, str | int) or isinstance(item_id, bool):
        item["id"] = None  # the error record is keyed by the line
        raise MoelocalError(f"'id' must be a string or a whole number, got {item_id!r}")
    return item


def scan(lines: list[str]) -> list[Entry]:
    """Every non-blank line parsed. Two lines with one id are refused before anything runs: a
    resumed run could not tell their results apart."""
    entries, first = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = Entry(n, parse_item(line))
        except MoelocalError as e:
            entry = Entry(n, error=str(e))
        if entry.item is not None:
            if entry.key in first:
                raise MoelocalError(f"--input: lines {first[entry.key]} and {n} have the same id "
                                    f"{entry.key}; give each line its own id")  # fmt: skip
            first[entry.key] = n
        entries.append(entry)
    return entries


def make_job(engine: Engine, entry: Entry, defaults: dict, chat: bool) -> Job:
    """One parsed line -> a Job, or MoelocalError saying what is wrong with it."""
    job = parse_job(entry, defaults, chat, engine.prompt_ids, engine.chat_prompt)
    engine.check_context(len(job.prompt_ids), job.max_new_tokens)
    return job


def parse_job(entry: Entry, defaults: dict, chat: bool, prompt_ids: Callable,
              chat_prompt: Callable) -> Job:  # fmt: skip
    """A line's Job, its prompt tokenized by prompt_ids(prompt, chat) or chat_prompt(messages)
    (an Engine's, or a Tokenizer's before the model is loaded); MoelocalError for a bad line."""
    item = entry.item
    max_new = item.get("max_new_tokens", defaults["max_new_tokens"])
    temperature = item.get("temperature", defaults["temperature"])
    seed = item.get("seed", defaults["seed"])
    validate.whole("'max_new_tokens'", max_new)
    validate.sampling(temperature, seed=seed)
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise MoelocalError("'messages' must be a list of {role, content} objects")
        ids = chat_prompt(messages)
    elif isinstance(item.get("prompt"), str):
        ids = prompt_ids(item["prompt"], chat)
    else:
        raise MoelocalError("needs a 'prompt' string or a 'messages' list")
    return Job(entry.line, item["id"], ids, max_new, float(temperature), seed)


def kv_tokens(tokenizer, entries: list[Entry], done: set[str], defaults: dict, chat: bool,
              batch_size: int) -> int | None:  # fmt: skip
    """The KV cache the lines still to run need at most, in tokens, for the model's plan (a
    budget's default context, 4096 tokens, would hold too much for short lines and too little
    for a batch): batch_size rows, each of the longest prompt and the most new tokens (as a
    batch is decoded); None where no line is good. tokenizer: the model's (tokenizer.py)."""
    jobs = []
    for entry in entries:
        if entry.key in done or entry.error:
            continue
        try:
            jobs.append(parse_job(entry, defaults, chat, tokenizer.encode_prompt,
                                  tokenizer.encode_chat))  # fmt: skip
        except MoelocalError:  # the line fails with its reason once the model is loaded
            continue
    if not jobs:
        return None
    longest = max(len(j.prompt_ids) for j in jobs)
    return min(batch_size, len(jobs)) * (longest + max(j.max_new_tokens for j in jobs))


def read_jobs(engine, entries, done: set[str], defaults: dict, chat: bool) -> Iterator[Job | dict]:
    """Jobs to run and error records, in input order, leaving out the lines already done."""
    for entry in entries:
        if entry.key in done:
            continue
        try:
            if entry.error:
                raise MoelocalError(entry.error)
            yield make_job(engine, entry, defaults, chat)
        except MoelocalError as e:
            yield {"id": entry.item.get("id") if entry.item else None, "line": entry.line,
                   "error": str(e)}  # fmt: skip


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
    entries: list[Entry],
    write: Callable[[dict], None],
    *,
    done: set[str] = frozenset(),
    batch_size: int = 1,
    defaults: dict,
    chat: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    progress: Callable[[Summary], None] = lambda summary: None,
) -> Summary:
    """Generate for every line of `entries` (see scan) whose key is not in `done`, `batch_size`
    prompts decoded together."""
    summary = Summary(skipped=sum(e.key in done for e in entries))
    group: list[Job] = []

    def flush_group():
        outs = engine.generate_batch(
            [j.prompt_ids for j in group], max_new_tokens=[j.max_new_tokens for j in group],
            temperature=[j.temperature for j in group], seed=[j.seed for j in group],
            top_k=top_k, top_p=top_p,
        )  # fmt: skip
        for job, out in zip(group, outs, strict=True):
            reasoning = {"reasoning": out.reasoning} if out.reasoning else {}
            write({"id": job.id, "text": out.text, **reasoning,
                   "prompt_tokens": len(out.prompt_token_ids),
                   "generated_tokens": len(out.token_ids), "token_ids": out.token_ids,
                   "finish_reason": out.finish_reason, "timings": timings(out.stats)})  # fmt: skip
            summary.done += 1
            summary.generated_tokens += len(out.token_ids)
        summary.seconds += max(o.stats.prefill_s + o.stats.decode_s for o in outs)
        group.clear()
        progress(summary)

    for item in read_jobs(engine, entries, done, defaults, chat):
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
        try:
            line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: keep it escaped
            line = json.dumps(record, allow_nan=False) + "\n"
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
