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
CachePolicyOpt = Annotated[str, typer.Option(help="Expert cache eviction: lru or lfu.")]
PrefetchOpt = Annotated[
    bool, typer.Option(help="Load the experts the next layer's router predicts, ahead of time.")
]
MissPolicyOpt = Annotated[
    str,
    typer.Option(help="CUDA: on a miss, load the expert (load), run it on the CPU (cpu), or "
                 "choose by a start-up cost model (auto)."),
]  # fmt: skip
ContextOpt = Annotated[
    int | None, typer.Option(help="Tokens of KV cache to plan for (default: 4096 with a budget).")
]


def offload_options(gpu_mem, cpu_mem, cache_experts, cache_policy, prefetch, miss_policy, context):
    return dict(gpu_mem=gpu_mem, cpu_mem=cpu_mem, cache_experts=cache_experts,
                cache_policy=cache_policy, prefetch=prefetch, miss_policy=miss_policy,
                context=context)  # fmt: skip


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
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
    cache_experts: CacheExpertsOpt = None,
    cache_policy: CachePolicyOpt = "lru",
    prefetch: PrefetchOpt = True,
    miss_policy: MissPolicyOpt = "auto",
    context: ContextOpt = None,
    as_json: JsonOpt = False,
):
    """Generate a completion for one prompt, streamed to stdout.

    Example: moelocal generate --prompt "Write a haiku about experts" -n 64 --cpu-mem 2GiB
    """
    from .engine import load

    options = offload_options(gpu_mem, cpu_mem, cache_experts, cache_policy, prefetch,
                              miss_policy, context)  # fmt: skip

    def go():
        engine = load(model, device=device, dtype=dtype, **options)
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


@app.command("plan")
def plan_cmd(
    model: ModelArg = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    gpu_mem: GpuMemOpt = None,
    cpu_mem: CpuMemOpt = None,
    cache_experts: CacheExpertsOpt = None,
    context: ContextOpt = None,
    hit_rate: Annotated[
        float, typer.Option(help="Hit rate for the expected bytes moved per token.")
    ] = 0.8,
    as_json: JsonOpt = False,
):
    """Show where each part of the model would live within the budgets, without loading it.

    Example: moelocal plan ./Mixtral-8x7B --gpu-mem 6GiB --cpu-mem 24GiB
    """
    from .engine import plan
    from .plan import human

    def go():
        p = plan(model, device=device, dtype=dtype, gpu_mem=gpu_mem, cpu_mem=cpu_mem,
                 cache_experts=cache_experts, context=context)  # fmt: skip
        moved = p.bytes_moved_per_token(hit_rate)
        if as_json:
            print(json.dumps(p.as_dict() | {"hit_rate": hit_rate, "bytes_moved_per_token": moved}))
            return
        from rich.table import Table

        device_name = "GPU" if p.device == "cuda" else "RAM"
        table = Table(title=f"plan ({p.device}, {str(p.dtype).removeprefix('torch.')})")
        for column in ("part", "bytes", "where"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for part, n in p.resident.items():
            if n:
                table.add_row(part.replace("_", " "), human(n), f"{device_name} (resident)")
        table.add_row(
            f"KV cache, {p.context} tokens", human(p.kv_bytes), f"{device_name} (resident)"
        )
        table.add_row(
            f"expert cache: {p.device_slots} of {p.n_experts} slots × {p.moe_layers} layers",
            human(p.cache_bytes), device_name,
        )  # fmt: skip
        if p.device == "cuda":
            table.add_row(f"host store: {p.host_experts} experts",
                          human(p.host_experts * p.expert_bytes), "RAM (pinned)")  # fmt: skip
        table.add_row(f"disk: {p.disk_experts} experts", human(p.disk_experts * p.expert_bytes),
                      "read on demand")  # fmt: skip
        Console().print(table)
        print(f"one expert: {human(p.expert_bytes)}; at a {hit_rate:.0%} hit rate a decoded token "
              f"moves {human(moved)} of experts")  # fmt: skip

    run(go)


def main():
    app()


if __name__ == "__main__":
    main()
