"""The `moelocal` command: one thin function per command over the library.

A MoelocalError is printed as one line and exits 1; MOELOCAL_DEBUG=1 shows the traceback.
"""

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .errors import MoelocalError

app = typer.Typer(
    help="Run big Mixture-of-Experts models on small hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Model directory, hub id in the local Hugging Face cache, or none for the "
                   "embedded default model.", show_default=False),
]  # fmt: skip
DeviceOpt = Annotated[str, typer.Option(help="Compute device: auto, cpu or cuda.")]
DtypeOpt = Annotated[
    str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's).")
]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")
]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")]
TopPOpt = Annotated[
    float | None,
    typer.Option(help="Sample from the smallest set of tokens with this total probability."),
]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]


@app.callback()
def main_callback():
    """Run big Mixture-of-Experts models on small hardware."""


def fail(message: str, code: int = 1):
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def run(fn):
    """Call fn, turning MoelocalError into one line on stderr and exit code 1."""
    try:
        return fn()
    except MoelocalError as e:
        if os.environ.get("MOELOCAL_DEBUG"):
            raise
        fail(str(e))


@app.command("generate")
def generate_cmd(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")] = ...,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="Tokenize the prompt as is.")
    ] = False,
    as_json: JsonOpt = False,
):
    """Generate a completion for one prompt, streamed to stdout.

    Example: moelocal generate --prompt "Write a haiku about experts" -n 64
    """
    from .engine import load

    def go():
        engine = load(model, device=device, dtype=dtype)
        tok = engine.tokenizer
        if tok is not None and tok.chat_template and not no_chat_template:
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
        else:
            ids = engine.encode(prompt)
        stream = None if as_json else lambda piece: (sys.stdout.write(piece), sys.stdout.flush())
        out = engine.generate(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stream=stream,
        )  # fmt: skip
        if as_json:
            print(json.dumps(out.as_dict(), ensure_ascii=False))
        else:
            sys.stdout.write("\n")
            s = out.stats
            err.print(
                f"[dim]{s.prompt_tokens} prompt tokens at {s.prefill_tokens_per_s:.1f} tok/s, "
                f"{s.generated_tokens} generated at {s.decode_tokens_per_s:.1f} tok/s[/]"
            )

    run(go)


def main():
    app()


if __name__ == "__main__":
    main()
