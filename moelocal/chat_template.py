"""Chat templates, rendered in a sandboxed jinja2 environment with bounds: a template from a
model's files can format text, never touch files or Python objects, and neither hang moelocal nor
exhaust its memory. Every failure is one MoelocalError."""

import json
import signal
import threading
from contextlib import contextmanager
from datetime import datetime

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import MoelocalError

MAX_CHARS = 16 * 1024 * 1024  # a prompt far beyond any context, still small in memory
SECONDS = 5.0  # real templates render in milliseconds


class TemplateTimeout(Exception):
    pass


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Refuses the operations that make huge values in one step ('a' * 10**10, 10 ** 10**10)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    if len(seq) * n > MAX_CHARS:
                        raise SecurityError("a repetition too large")
        if operator == "**" and isinstance(left, int | float) and isinstance(right, int | float):
            if abs(right) > 1024 and abs(left) > 1:
                raise SecurityError("a power too large")
        return super().call_binop(context, operator, left, right)


def raise_exception(message):
    raise TemplateError(message)


def environment() -> BoundedEnvironment:
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@contextmanager
def time_limit(seconds: float):
    """Raise TemplateTimeout in this thread after `seconds` (the main thread of a POSIX process;
    elsewhere the output bound still holds)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render(source: str, **variables) -> str:
    """The template's text for these variables, or MoelocalError saying why there is none."""
    try:
        with time_limit(SECONDS):
            template = environment().from_string(source)
            pieces, size = [], 0
            for piece in template.generate(**variables):
                size += len(piece)
                if size > MAX_CHARS:
                    raise SecurityError(f"output over {MAX_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
    except TemplateTimeout:
        raise MoelocalError(f"chat template failed: still rendering after {SECONDS:g} s") from None
    except (TemplateError, RecursionError, ArithmeticError, TypeError, ValueError, LookupError,
            AttributeError, MemoryError) as e:  # fmt: skip
        raise MoelocalError(f"chat template failed: {type(e).__name__}: {e}") from None
