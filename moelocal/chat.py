"""The terminal chat: multi-turn history through the model's chat template, streamed replies,
slash commands, Ctrl-C to stop a reply, the oldest turns dropped when the context is full.

It reads lines from any text stream, so it works the same in a terminal and behind a pipe; the
prompt marker and colours appear only on a terminal.
"""

import sys
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .engine import Engine, Generation
from .errors import MoelocalError, printable

HELP = """commands:
  /help    this list
  /stats   speed and expert-cache figures for the last reply and the session
  /reset   forget the conversation (the system prompt stays)
  /exit    leave (or Ctrl-D); Ctrl-C stops a reply"""


@dataclass
class Session:
    replies: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    last: Generation | None = None
    history: list[dict] = field(default_factory=list)


def transcript(messages: list[dict]) -> str:
    """A conversation as plain text, for a model without a chat template (as llama.cpp and
    ollama fall back to): the model continues after "Assistant:" and stops at the next "User:"."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    turns = [f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join(turns + ["Assistant:"])


class Chat:
    def __init__(self, engine: Engine, *, system: str | None = None, plain: bool = False,
                 show_reasoning: bool = False, **sampling):  # fmt: skip
        """plain: a plain transcript instead of the chat template (--no-chat-template);
        show_reasoning: a reasoning model's reasoning shown dimmed before its answer (else
        hidden, counted in one dim line)."""
        if engine.tokenizer is None:
            raise MoelocalError(f"{engine.model_dir}: no tokenizer.json; chat needs one")
        self.engine, self.system, self.sampling = engine, system, sampling
        self.show_reasoning = show_reasoning
        self.console = Console(highlight=False)  # replies and /stats
        self.notes = Console(stderr=True, highlight=False)  # notices, errors
        self.plain = plain or not engine.tokenizer.chat_template
        if self.plain:
            if not plain:
                self.notes.print("[yellow]the model has no chat template: a plain User:/Assistant: "
                                 "transcript stands in for it[/]")  # fmt: skip
            self.sampling["stop"] = ["\nUser:"]
        self.session = Session()
        ec = engine.expert_cache
        self.expert_stats_start = ec.stats.copy() if ec else None
        self.prompt_cache = engine.new_prompt_cache()  # each turn prefills only what is new

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.session.history

    def prompt_ids(self) -> list[int]:
        if self.plain:
            return self.engine.encode(transcript(self.messages()))
        return self.engine.chat_prompt(self.messages())

    def fit_context(self) -> list[int]:
        """The conversation's ids, dropping the oldest turns until the reply fits the context."""
        limit = self.engine.context_length - self.sampling["max_new_tokens"]
        dropped = 0
        while True:
            ids = self.prompt_ids()
            if len(ids) <= limit:
                break
            if len(self.session.history) <= 1:
                raise MoelocalError(f"this message ({len(ids)} tokens) does not fit the context "
                                    f"of {self.engine.context_length} tokens")  # fmt: skip
            del self.session.history[:2]  # the oldest user turn and its reply
            dropped += 1
        if dropped:
            self.notes.print(f"[yellow]\\[dropped the {dropped} oldest turn(s) to fit the "
                               f"context of {self.engine.context_length} tokens][/]")  # fmt: skip
        return ids

    def reply(self, text: str):
        self.session.history.append({"role": "user", "content": text})
        try:
            ids = self.fit_context()
        except MoelocalError:
            self.session.history.pop()
            raise
        pieces: list[str] = []
        thinking = []  # a reasoning model's reasoning is shown (dimmed) or counted, never kept

        def stream(piece: str):
            if thinking and self.show_reasoning:
                self.console.out("\n")  # the answer on a line of its own after the reasoning
                thinking.clear()
            pieces.append(piece)
            self.console.out(piece, end="", highlight=False)
            self.console.file.flush()

        def reasoning_stream(piece: str):
            thinking.append(piece)
            if self.show_reasoning:
                self.console.out(piece, end="", style="dim", highlight=False)
                self.console.file.flush()

        try:
            out = self.engine.generate(ids, stream=stream, reasoning_stream=reasoning_stream,
                                       prompt_cache=self.prompt_cache, **self.sampling)  # fmt: skip
            answer = out.text
            self.session.last = out
            self.count(out)
            if out.reasoning and not self.show_reasoning:
                self.notes.print(f"[dim]\\[reasoned {len(out.reasoning)} characters before this "
                                 "answer: --show-reasoning shows them][/]")  # fmt: skip
        except KeyboardInterrupt:
            answer = "".join(pieces)  # what was shown stays in the conversation
            self.console.out("")
            self.notes.print("[dim]\\[stopped][/]", end="")
        self.console.out("")
        # the answer only: templates leave earlier turns' reasoning out of the prompt
        self.session.history.append({"role": "assistant", "content": answer})

    def count(self, out: Generation):
        s = self.session
        s.replies += 1
        s.prompt_tokens += out.stats.prompt_tokens
        s.generated_tokens += out.stats.generated_tokens
        s.prefill_s += out.stats.prefill_s
        s.decode_s += out.stats.decode_s

    def stats_table(self) -> Table:
        table = Table(title="stats")
        for column in ("", "last reply", "session"):
            table.add_column(column, justify="right")
        s, last = self.session, self.session.last
        ls = last.stats if last else None

        def rate(tokens, seconds):
            return f"{tokens / seconds:.1f}" if seconds else "-"

        rows = [
            ("prompt tokens", ls.prompt_tokens if ls else "-", s.prompt_tokens),
            ("of them reused", ls.extra.get("cached_prompt_tokens", 0) if ls else "-", "-"),
            ("generated tokens", ls.generated_tokens if ls else "-", s.generated_tokens),
            ("prefill tok/s", f"{ls.prefill_tokens_per_s:.1f}" if ls else "-",
             rate(s.prompt_tokens, s.prefill_s)),
            ("decode tok/s", f"{ls.decode_tokens_per_s:.1f}" if ls else "-",
             rate(s.generated_tokens - s.replies, s.decode_s)),
            ("time to first token", f"{ls.prefill_s * 1000:.0f} ms" if ls else "-", "-"),
        ]  # fmt: skip
        ec = self.engine.expert_cache
        if ec is not None:
            session = ec.stats.since(self.expert_stats_start).as_dict(ec.expert_bytes)
            reply = ls.extra.get("experts", {}) if ls else {}
            for name, fmt in (("hit_rate", "{:.0%}"), ("misses", "{}"),
                              ("prefetch_precision", "{:.0%}"), ("prefetch_recall", "{:.0%}"),
                              ("bytes_moved", "{:,}"), ("prefetch_bytes", "{:,}"),
                              ("stall_s", "{:.2f} s")):  # fmt: skip
                mine = fmt.format(reply[name]) if name in reply else "-"
                rows.append((name.replace("_", " "), mine, fmt.format(session[name])))
        for row in rows:
            table.add_row(*map(str, row))
        return table

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name = line.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.console.print(HELP, highlight=False)
        elif name == "/stats":
            self.console.print(self.stats_table())
        elif name in ("/reset", "/clear"):
            self.session.history.clear()
            self.prompt_cache.clear()
            self.notes.print("[dim]\\[conversation reset][/]")
        else:
            self.notes.print(f"unknown command {name}; /help lists them")
        return True

    def run(self, lines=None):
        """Read turns until /exit or the end of input."""
        interactive = lines is None and sys.stdin.isatty()
        if lines is None and hasattr(sys.stdin, "reconfigure"):
            # bytes that are not UTF-8 reach the tokenizer as lone surrogates: one error line
            # for that turn, not the end of the chat
            sys.stdin.reconfigure(errors="surrogateescape")
        lines = iter(lines) if lines is not None else sys.stdin
        if interactive:
            self.notes.print("[dim]/help for commands, Ctrl-C stops a reply, Ctrl-D leaves[/]")
        while True:
            try:
                line = input("> ") if interactive else next(lines, None)
            except EOFError:
                line = None
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                self.console.out("")
                continue
            if line is None:
                if interactive:
                    self.console.out("")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.reply(line)
            except MoelocalError as e:
                self.notes.print(f"[red]error:[/] {escape(printable(e))}")
