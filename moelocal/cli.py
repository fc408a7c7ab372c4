"""The `moelocal` command: one thin function per command over the library.

A MoelocalError is printed as one line and exits 1; MOELOCAL_DEBUG=1 shows the traceback.
"""

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import validate
from .errors import MoelocalError, printable, reason

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
ShowReasoningOpt = Annotated[
    bool,
    typer.Option(
        "--show-reasoning", help="Show a reasoning model's reasoning (dimmed) before its answer."
    ),
]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        help="Quantize the experts and Linear layers on load: none, int8, int4 (CPU) or "
        "nf4. A bitsandbytes checkpoint keeps its own format by default."
    ),
]
GpuMemOpt = Annotated[
    str | None,
    typer.Option(help="GPU budget (e.g. 6GiB): resident weights, KV cache and expert slots."),
]
CpuMemOpt = Annotated[
    str | None,
    typer.Option(help="RAM budget (e.g. 12GiB): the host expert store; on a CPU-only machine, "
                 "everything. Experts that do not fit are read from disk."),
]  # fmt: skip
CacheExpertsOpt = Annotated[
    int | None, typer.Option(help="Expert slots per layer in the fastest tier (overrides budgets).")
]
CachePolicyOpt = Annotated[
    str,
    typer.Option(
        help="Expert cache eviction: learned (the expert a map fitted by moelocal calibrate "
        "expects least soon; LRU where the model has none), lru or lfu."
    ),
]
PrefetchOpt = Annotated[
    bool, typer.Option(help="Load the experts the next layer's router predicts, ahead of time.")
]
PrefetchDepthOpt = Annotated[
    int, typer.Option(help="Guess each layer's experts this many layers before it runs.")
]
MissPolicyOpt = Annotated[
    str,
    typer.Option(help="CUDA: on a miss, load the expert (load), run it on the CPU (cpu), or "
                 "choose by a start-up cost model (auto)."),
]  # fmt: skip
ThreadsOpt = Annotated[
    int | None, typer.Option(help="CPU threads for the model (default: the physical cores).")
]
ContextOpt = Annotated[
    int | None, typer.Option(help="Tokens of KV cache to plan for (default: 4096 with a budget).")
]


def offload_options(gpu_mem, cpu_mem, cache_experts, cache_policy, prefetch, prefetch_depth,
                    miss_policy, context):  # fmt: skip
    return dict(gpu_mem=gpu_mem, cpu_mem=cpu_mem, cache_experts=cache_experts,
                cache_policy=cache_policy, prefetch=prefetch, prefetch_depth=prefetch_depth,
                miss_policy=miss_policy, context=context)  # fmt: skip


@app.callback()
def main_callback():
    """Run big Mixture-of-Experts models on small hardware."""


def fail(message: str, code: int = 1):
    err.print(f"[bold red]error:[/] {escape(printable(message))}", soft_wrap=True)
    raise typer.Exit(code)


def run(fn):
    """Call fn, turning MoelocalError into one line on stderr and exit code 1, Ctrl-C into 130.
    So does an OSError nothing caught before (a full disk, a file that cannot be written)."""
    try:
        return fn()
    except BrokenPipeError:  # stdout closed (| head): click ends quietly
        raise
    except (MoelocalError, OSError) as e:
        if os.environ.get("MOELOCAL_DEBUG"):
            raise
        if isinstance(e, OSError) and e.filename:
            fail(f"{e.filename}: {reason(e)}")
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", code=130)


def early_reads(model, device, options: dict):
    """A converted model's experts, read while torch is imported (preread.py); None where they
    cannot start early."""
    from .preread import start

    return start(model, device, options["cpu_mem"], options["cache_experts"])


def heavy_import(module: str):
    """moelocal.<module>, imported with Ctrl-C held back until the import ends: torch's import
    (about a second) swallows a KeyboardInterrupt raised inside it at some points, and the
    command then ran to its end. An interrupt during the import ends the command afterwards."""
    import importlib
    import signal

    interrupted = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    except ValueError:  # not the main thread: nothing to hold back
        return importlib.import_module(f".{module}", __package__)
    try:
        return importlib.import_module(f".{module}", __package__)
    finally:
        signal.signal(signal.SIGINT, previous)
        if interrupted:
            fail("interrupted", code=130)


@app.command("generate")
def generate_cmd(
    model: ModelArg = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt text.")] = None,
    input_path: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help='JSONL of {"id", "prompt"} or {"id", "messages"}, '
            "optionally with max_new_tokens, temperature, seed; - for stdin.",
        ),
    ] = None,
    output_path: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="JSONL results, appended as each prompt finishes; "
            "lines with a result there are skipped (default: stdout).",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Prompts decoded together: each expert loaded serves them all.")
    ] = 1,
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
    quant: QuantOpt = None,
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
    cache_experts: CacheExpertsOpt = None,
    cache_policy: CachePolicyOpt = "learned",
    prefetch: PrefetchOpt = True,
    prefetch_depth: PrefetchDepthOpt = 1,
    miss_policy: MissPolicyOpt = "auto",
    context: ContextOpt = None,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    show_reasoning: ShowReasoningOpt = False,
):
    """Generate a completion for one prompt, streamed to stdout, or for every line of a JSONL file.

    Example: moelocal generate --prompt "Write a haiku about experts" -n 64 --cpu-mem 2GiB
    Example: moelocal generate --input prompts.jsonl --output results.jsonl --batch-size 8
    """
    options = offload_options(gpu_mem, cpu_mem, cache_experts, cache_policy, prefetch,
                              prefetch_depth, miss_policy, context)  # fmt: skip
    if (prompt is None) == (input_path is None):
        fail("give either --prompt or --input")
    if output_path is not None and input_path is None:
        fail("--output goes with --input; for one prompt, --json > FILE")
    run(lambda: validate.sampling(temperature, top_k, top_p, seed))
    run(lambda: validate.whole("--max-new-tokens", max_new_tokens))
    if batch_size < 1:
        fail(f"--batch-size {batch_size}: must be at least 1")
    if input_path is not None:
        defaults = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        batch_kwargs = dict(batch_size=batch_size, defaults=defaults, top_k=top_k, top_p=top_p,
                            chat=not no_chat_template)  # fmt: skip
        load_kwargs = dict(device=device, dtype=dtype, quant=quant, threads=threads, **options)
        raise typer.Exit(run(lambda: batch_generate(model, input_path, output_path, load_kwargs,
                                                    batch_kwargs)))  # fmt: skip

    preread = early_reads(model, device, options)
    load = heavy_import("engine").load

    def go():
        if options["context"] is None:
            options["context"] = generation_context(model, prompt, not no_chat_template,
                                                    max_new_tokens)  # fmt: skip
        with load(model, device=device, dtype=dtype, quant=quant, threads=threads,
                  preread=preread, **options) as engine:  # fmt: skip
            ids = engine.prompt_ids(prompt, chat_template=not no_chat_template)
            stream = None if as_json else lambda p: (sys.stdout.write(p), sys.stdout.flush())
            thought = None  # reasoning: dimmed on stderr with --show-reasoning, else only in JSON
            if show_reasoning and not as_json:
                thought = lambda p: err.print(p, end="", style="dim", highlight=False)  # noqa: E731
            out = engine.generate(
                ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed, stream=stream, reasoning_stream=thought,
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


def generation_context(model, prompt: str, chat_template: bool, max_new_tokens: int) -> int | None:
    """The context one prompt's generation needs: its tokens and max_new_tokens (a budget's
    default, 4096 tokens, would keep room for a KV cache and a prefill it never uses from the
    expert slots); None where the model has no tokenizer (the load says what is wrong)."""
    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        return None
    return len(tokenizer.encode_prompt(prompt, chat_template)) + max_new_tokens


def model_tokenizer(model):
    """The model's tokenizer, read before the model is; None where it has none."""
    from .hub import resolve_model
    from .model_files import model_file
    from .tokenizer import Tokenizer

    model_dir = resolve_model(model)
    return Tokenizer(model_dir) if model_file(model_dir, "tokenizer.json") is not None else None


def batch_context(model, entries, done: set[str], load_kwargs: dict, batch_kwargs: dict):
    """The KV cache to plan --input's lines for (batch.kv_tokens), where it fits the budget;
    else None, a budget's default, and the lines that need more fail one by one."""
    from .batch import kv_tokens
    from .engine import plan

    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        return None
    need = kv_tokens(tokenizer, entries, done, batch_kwargs["defaults"], batch_kwargs["chat"],
                     batch_kwargs["batch_size"])  # fmt: skip
    if need is None:
        return None
    options = {name: v for name, v in load_kwargs.items() if name != "threads"}
    try:
        plan(model, **{**options, "context": need})
    except MoelocalError:
        return None
    return need


def batch_generate(model, input_path: Path, output_path: Path | None, load_kwargs, batch_kwargs):
    """--input mode of generate: returns the exit code (1 if any line failed)."""
    load = heavy_import("engine").load
    from .batch import JsonlWriter, read_lines, resume_output, run_batch, scan

    from_stdin = str(input_path) == "-"
    if not from_stdin and not input_path.exists():
        raise MoelocalError(f"--input {input_path}: no such file")
    if not from_stdin and input_path.is_dir():
        raise MoelocalError(f"--input {input_path}: is a directory")
    if output_path is not None and output_path.exists() and not output_path.is_file():
        what = "a directory" if output_path.is_dir() else "not a regular file"
        raise MoelocalError(f"--output {output_path}: is {what}; leave --output out for stdout")
    if (output_path and not from_stdin and output_path.exists() and input_path.is_file()
            and os.path.samefile(input_path, output_path)):  # fmt: skip
        raise MoelocalError(f"--input and --output are the same file ({output_path})")
    # every line is read and checked first: duplicate ids are refused before anything runs
    entries = scan(read_lines(sys.stdin.buffer.read() if from_stdin else input_path.read_bytes()))
    done = resume_output(output_path) if output_path else set()
    with JsonlWriter(output_path) as writer:  # opened before the load: a bad --output fails now
        if load_kwargs["context"] is None:
            load_kwargs["context"] = batch_context(model, entries, done, load_kwargs, batch_kwargs)
        engine = load(model, **load_kwargs)
        total = len(entries)
        progress_bar = None
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            progress_bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[speed]}"), console=err)  # fmt: skip
            skipped = sum(e.key in done for e in entries)
            task = progress_bar.add_task("", total=total, completed=skipped, speed="")
            progress_bar.start()

        def progress(s):
            if progress_bar is not None:
                speed = f"{s.tokens_per_s:.1f} tok/s" if s.seconds else ""
                progress_bar.update(task, completed=s.skipped + s.done + s.failed, speed=speed)

        try:
            summary = run_batch(engine, entries, writer, done=done, progress=progress,
                                **batch_kwargs)  # fmt: skip
        except KeyboardInterrupt:
            where = (
                f"in {output_path}; rerun the same command to resume" if output_path else "above"
            )
            fail(f"interrupted: the results finished so far are {where}", code=130)
        finally:
            if progress_bar is not None:
                progress_bar.stop()
            engine.close()
    err.print(f"{summary.done} done, {summary.failed} failed, {summary.skipped} already in the "
              f"output; {summary.generated_tokens} tokens at {summary.tokens_per_s:.1f} tok/s",
              soft_wrap=True,
              highlight=False)  # fmt: skip
    return 1 if summary.failed else 0


@app.command("chat")
def chat_cmd(
    model: ModelArg = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="A plain User:/Assistant: transcript.")
    ] = False,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    quant: QuantOpt = None,
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
    cache_experts: CacheExpertsOpt = None,
    cache_policy: CachePolicyOpt = "learned",
    prefetch: PrefetchOpt = True,
    prefetch_depth: PrefetchDepthOpt = 1,
    miss_policy: MissPolicyOpt = "auto",
    context: ContextOpt = None,
    threads: ThreadsOpt = None,
    show_reasoning: ShowReasoningOpt = False,
):
    """Chat in the terminal: replies stream as they are generated; /help lists the commands.

    Reads lines from stdin when it is not a terminal, one reply per line.
    Example: moelocal chat --system "You are terse." --temperature 0.7
    """
    options = offload_options(gpu_mem, cpu_mem, cache_experts, cache_policy, prefetch,
                              prefetch_depth, miss_policy, context)  # fmt: skip
    run(lambda: validate.sampling(temperature, top_k, top_p, seed))
    run(lambda: validate.whole("--max-new-tokens", max_new_tokens))
    preread = early_reads(model, device, options)
    Chat, load = heavy_import("chat").Chat, heavy_import("engine").load

    def go():
        with load(model, device=device, dtype=dtype, quant=quant, threads=threads,
                  preread=preread, **options) as engine:  # fmt: skip
            Chat(engine, system=system, plain=no_chat_template, show_reasoning=show_reasoning,
                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed).run()  # fmt: skip

    run(go)


@app.command("serve")
def serve_cmd(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to listen on (all: 0.0.0.0).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MOELOCAL_API_KEY",
            help="Require Authorization: Bearer KEY on every request.",
            show_envvar=True,
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option(min=1, max=256, help="Requests decoded together at most.")
    ] = 8,
    model_name: Annotated[
        str | None, typer.Option(help="The name clients ask for (default: the model's).")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    quant: QuantOpt = None,
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
    cache_experts: CacheExpertsOpt = None,
    cache_policy: CachePolicyOpt = "learned",
    prefetch: PrefetchOpt = True,
    prefetch_depth: PrefetchDepthOpt = 1,
    miss_policy: MissPolicyOpt = "auto",
    context: ContextOpt = None,
    threads: ThreadsOpt = None,
):
    """Serve the model over OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics. Requests waiting when a decode starts are decoded together.

    Example: moelocal serve mixtral-large-int4 --port 8000, then
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'
    """
    options = offload_options(gpu_mem, cpu_mem, cache_experts, cache_policy, prefetch,
                              prefetch_depth, miss_policy, context)  # fmt: skip
    if api_key is not None and not api_key.strip():
        fail("--api-key is empty")
    name = model_name or (Path(model).name if model and Path(model).exists() else model)

    def go():
        import uvicorn

        load = heavy_import("engine").load
        Server = heavy_import("serve").Server
        server = Server(lambda: load(model, device=device, dtype=dtype, quant=quant,
                                     threads=threads, **options),
                        name or "default", api_key, max_batch)  # fmt: skip
        config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning")
        http = uvicorn.Server(config)
        server.start(on_load_error=lambda: setattr(http, "should_exit", True))
        err.print(f"[dim]serving {name or 'default'} at http://{host}:{port}/v1 (loading the "
                  "model; /health says when it is ready)[/]")  # fmt: skip
        http.run()
        if server.load_error is not None:
            raise MoelocalError(server.load_error)
        if not http.started:
            raise MoelocalError(f"cannot listen on {host}:{port} (in use, or not allowed)")

    run(go)


@app.command("plan")
def plan_cmd(
    model: ModelArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    quant: QuantOpt = None,
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
    cache_experts: CacheExpertsOpt = None,
    context: ContextOpt = None,
    hit_rate: Annotated[
        float | None,
        typer.Option(
            help="Hit rate for the expected bytes moved per token [default: the share "
            "of each layer's experts the plan caches, as evenly spread routing gives]"
        ),
    ] = None,
    trace_path: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Take the hit rate from this routing trace (bench --trace), "
            "as LRU would have had it at the plan's slots.",
        ),
    ] = None,  # fmt: skip
    as_json: JsonOpt = False,
):
    """Show where each part of the model would live within the budgets, without loading it, and
    the decode speed the performance model predicts for it (bandwidths measured now).

    Example: moelocal plan ./Mixtral-8x7B --gpu-mem 6GiB --cpu-mem 24GiB
    """
    plan = heavy_import("engine").plan
    from .hub import resolve_model
    from .perf_model import measure, predicted_seconds
    from .plan import human
    from .slot_map import waits_for_reads
    from .trace import RoutingTrace

    if hit_rate is not None and not 0 <= hit_rate <= 1:  # NaN included
        fail(f"--hit-rate {hit_rate}: a share from 0 to 1 (0.8 is 80%)")

    def go():
        p = plan(model, device=device, dtype=dtype, quant=quant, gpu_mem=gpu_mem, cpu_mem=cpu_mem,
                 cache_experts=cache_experts, context=context)  # fmt: skip
        if hit_rate is not None:
            rate, source = hit_rate, "an assumed"
        else:  # an LRU cache of s of E experts under routing spread evenly holds s / E of them
            rate = p.cache_slots / max(1, p.n_experts * p.moe_layers)
            source = "an even routing's"
        if trace_path is not None:
            trace = RoutingTrace.load(trace_path)
            if trace.header.get("experts") != p.n_experts:
                raise MoelocalError(f"--trace {trace_path}: routing over "
                                    f"{trace.header.get('experts')} experts a layer, the model "
                                    f"has {p.n_experts}")  # fmt: skip
            waits = waits_for_reads(p.expert_bytes)  # as the cache's slot maps would
            rate, source = trace.hit_rate(p.layer_slots(), waits), "the trace's"
        if p.device_slots >= p.n_experts:
            rate, source = 1.0, "a"
        moved = p.bytes_moved_per_token(rate)
        bw = measure(p, resolve_model(model))
        tok_s = 1 / predicted_seconds(p, rate, bw)
        if as_json:
            print(json.dumps(p.as_dict() | {
                "hit_rate": rate, "bytes_moved_per_token": moved,
                "bytes_read_per_token": p.bytes_read_per_token(), "predicted_tok_s": tok_s,
                "memory_bytes_per_s": bw.memory, "disk_bytes_per_s": bw.disk,
                "host_bytes_per_s": bw.host}))  # fmt: skip
            return
        Console().print(p.table())
        for note in p.notes:
            print(note)
        print(f"one expert: {human(p.expert_bytes)}; at {source} {rate:.0%} hit rate a decoded "
              f"token moves {human(moved)} of experts")  # fmt: skip
        print(f"predicted decode: {tok_s:.1f} tok/s (weights read per token "
              f"{human(p.bytes_read_per_token())} at {bw.memory / 1e9:.1f} GB/s, experts moved "
              f"at {(bw.host or bw.disk) / 1e9:.2f} GB/s{' from the host store' if bw.host else ''}"
              ")")  # fmt: skip

    run(go)


@app.command("bench")
def bench_cmd(
    model: ModelArg = None,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", "-p", help="Prompt length.")
    ] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-n", help="Tokens to decode.")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Runs per row.")] = 3,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    gpu_mem: Annotated[str | None, typer.Option(help="GPU budgets, comma-separated.")] = None,
    cpu_mem: Annotated[str | None, typer.Option(help="RAM budgets, comma-separated.")] = None,
    cache_experts: Annotated[
        str | None, typer.Option(help="Expert slots per layer, comma-separated.")
    ] = None,
    cache_policy: Annotated[
        str | None, typer.Option(help="learned, lru, lfu or lru,learned.")
    ] = None,
    prefetch: Annotated[str | None, typer.Option(help="on, off or on,off.")] = None,
    prefetch_depth: Annotated[
        str | None, typer.Option(help="Layers ahead to guess experts, comma-separated.")
    ] = None,
    quant: Annotated[
        str | None, typer.Option(help="none, int8, int4, nf4, comma-separated.")
    ] = None,
    threads: Annotated[
        str | None, typer.Option(help="CPU threads, comma-separated (default: physical cores).")
    ] = None,
    trace_path: Annotated[
        Path | None,
        typer.Option("--trace", help="Write the first row's decode routing here (JSON lines)."),
    ] = None,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV for scripts.")] = False,
):
    """Measure prefill and decode speed and the expert cache, one row per configuration.

    Comma-separated values sweep: every combination gets a row.
    Example: moelocal bench --cache-experts 2,4,8 --prefetch on,off -p 256 -n 64
    """
    bench = heavy_import("bench")
    bench_config, configurations, report_table = (bench.bench_config, bench.configurations,
                                                  bench.report_table)  # fmt: skip

    if min(prompt_tokens, gen_tokens, repetitions) < 1 or gen_tokens < 2:
        fail("--prompt-tokens and --repetitions must be at least 1, --gen-tokens at least 2")

    from .trace import RoutingTrace

    def go():
        sweeps = dict(gpu_mem=gpu_mem, cpu_mem=cpu_mem, cache_experts=cache_experts,
                      cache_policy=cache_policy, prefetch=prefetch,
                      prefetch_depth=prefetch_depth, quant=quant, threads=threads)  # fmt: skip
        rows, trace = [], None
        if trace_path is not None:
            RoutingTrace.check_path(trace_path)
            trace = RoutingTrace({})
        for i, config in enumerate(configurations(sweeps)):
            rows.append(bench_config(model, config, device=device, dtype=dtype,
                                     prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                     repetitions=repetitions,
                                     trace=trace if i == 0 else None))  # fmt: skip
        if trace is not None:
            trace.save(trace_path)
        return rows

    rows = run(go)
    if as_json:
        print(json.dumps(rows))
    elif as_csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:  # piped: as wide as the table needs, not 80 columns
        Console(width=None if sys.stdout.isatty() else 200).print(report_table(rows))


@app.command("convert")
def convert_cmd(
    model: ModelArg = None,
    quant: Annotated[
        str | None,
        typer.Option(
            help="none, int8, int4 or nf4 (default: int4; a bitsandbytes checkpoint "
            "keeps its own format)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: the data directory).")
    ] = None,
    dtype: DtypeOpt = None,
):
    """Pack a checkpoint for moelocal: each expert one aligned, checksummed blob, quantized.

    A converted model loads fast and its disk tier streams experts straight from the file.
    Example: moelocal convert ./Mixtral-8x7B --quant int4
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    convert, pick_dtype = heavy_import("convert").convert, heavy_import("engine").pick_dtype

    columns = (TextColumn("converting experts"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task("", total=None)

        def progress(done, total):
            bar.update(task, completed=done, total=total)

        path = run(lambda: convert(model, quant, out, pick_dtype(dtype), progress))
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{path}: {size / 1e9:.2f} GB")


@app.command("calibrate")
def calibrate_cmd(
    model: ModelArg = None,
    text: Annotated[
        Path, typer.Option(help="UTF-8 text of the kind the model will run (a few pages or more).")
    ] = ...,
    tokens: Annotated[int, typer.Option(help="Tokens of the text to run at most.")] = 8192,
    prefetch_depth: Annotated[
        int, typer.Option(help="Fit the guesses of every depth from 1 to this.")
    ] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the fits here (default: the data directory, where every "
            "later load of this model finds them)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
):
    """Fit the prefetcher's guesses and the expert cache's eviction to text the model runs.

    The next layer's router guesses from the current hidden state; where the model changes it
    a lot between layers, a linear map fitted on this text guesses better. A second map per
    layer scores which experts the coming tokens will use, for the learned eviction policy.
    Fits are kept only where they beat the router (or LRU) on the text's last tokens, and used
    by every later load.
    Example: moelocal calibrate ./Mixtral-8x7B --text notes.txt
    """
    validate.whole("tokens", tokens)
    validate.whole("prefetch_depth", prefetch_depth)

    def calibrate():
        if out is not None:  # the data directory's file is ours, damaged or not
            heavy_import("predictor").check_replaceable(out)
        try:
            content = text.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MoelocalError(f"{text}: not UTF-8 text (byte {e.start})") from None
        engine_mod, predictor = heavy_import("engine"), heavy_import("predictor")
        options = dict(gpu_mem=gpu_mem, cpu_mem=cpu_mem, prefetch=False)
        with engine_mod.load(model, device=device, dtype=dtype, **options) as engine:
            fit = heavy_import("calibrate").calibrate
            predictors, fits, reuse_fits = fit(engine, content, tokens, prefetch_depth)
            fp = predictor.fingerprint(engine.model)
        path = out if out is not None else predictor.stored_path(fp)
        predictor.write(path, predictors, fp)
        return fits, reuse_fits, path

    fits, reuse_fits, path = run(calibrate)
    for f in fits:  # recall of the k+1 guesses on the text's held-out last tokens
        verdict = "fitted" if f.kept else "the router guesses as well"
        source = "the embedding" if f.source < 0 else f"layer {f.source}"
        print(
            f"{source} -> {f.target}: recall {f.router_recall:.3f} by the router, "
            f"{f.fitted_recall:.3f} fitted ({verdict})"
        )
    for f in reuse_fits:  # hit rate at 1/4, 1/2 and 3/4 of the experts cached, held-out tokens
        verdict = "fitted" if f.kept else "LRU evicts as well"
        print(
            f"layer {f.layer} eviction: hit rate {f.lru_hit_rate:.3f} by LRU, "
            f"{f.fitted_hit_rate:.3f} fitted ({verdict})"
        )
    print(f"{path}: {sum(f.kept for f in fits)} of {len(fits)} layers' guesses fitted, "
          f"{sum(f.kept for f in reuse_fits)} of {len(reuse_fits)} layers' evictions")  # fmt: skip


@app.command("pull")
def pull_cmd(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. Qwen/Qwen3-30B-A3B.")],
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
):
    """Download a model's config, safetensors and tokenizer into the Hugging Face cache.

    Interrupted downloads resume. Example: moelocal pull allenai/OLMoE-1B-7B-0924
    """
    from .hub import pull

    def go():
        path = pull(repo_id, revision)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        print(f"{repo_id}: {size / 1e9:.2f} GB in {path}")

    run(go)


@app.command("rm")
def rm_cmd(
    model: Annotated[str, typer.Argument(help="A converted model's name, or a hub id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
):
    """Remove a converted model from the data directory, or a download from the Hugging Face
    cache; never anything else.

    Example: moelocal rm Qwen--Qwen3-30B-A3B-int4
    """
    from .remove import removal

    target = run(lambda: removal(model))
    question = f"remove {printable(target.what)} ({target.size / 1e9:.2f} GB)?"
    if not yes:
        if not sys.stdin.isatty():
            fail(f"{question} add --yes to remove without asking")
        if not typer.confirm(question, default=False):
            fail("nothing removed")
    run(target.run)
    print(f"removed {printable(target.what)}")


@app.command("list")
def list_cmd(as_json: JsonOpt = False):
    """List the MoE models found locally: the Hugging Face cache and moelocal's data directory.

    Example: moelocal list
    """
    from .hub import local_models

    rows = run(local_models)
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        err.print("no MoE models found locally; moelocal pull REPO_ID downloads one")
        return
    from rich.table import Table

    table = Table()
    for column in ("model", "architecture", "size", "experts", "quantization", "source"):
        table.add_column(column, justify="right" if column in ("size", "experts") else "left")
    for r in rows:
        if r.get("broken"):
            table.add_row(escape(printable(r["name"])), "[red]broken[/]", "", "",
                          escape(printable(r["broken"])), r["source"])  # fmt: skip
            continue
        experts = f"{r['experts_per_token']} of {r['experts']}"
        cells = (r["name"], r["architecture"], f"{r['size_bytes'] / 1e9:.2f} GB", experts,
                 r["quantization"], r["source"])  # fmt: skip
        table.add_row(*(escape(printable(c)) for c in cells))
    Console().print(table)


def main():
    app()


if __name__ == "__main__":
    main()
