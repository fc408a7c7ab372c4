"""`moelocal bench`: llama-bench's rows (prefill and decode tokens/s, mean ± std over repetitions)
plus what only an offloading engine can show: hit rate, prefetch precision and recall, bytes moved
per token, the share of time stalled on experts, peak memory, the floor of DESIGN.md's
performance model: time per token >= max(compute time, bytes moved ÷ measured bandwidth), and what
`plan`'s model (perf_model.py) predicts at the run's hit rate.
"""

import itertools
import statistics
from dataclasses import fields

import torch
from rich.table import Table

from .engine import Engine, load, reset_peak_memory
from .errors import MoelocalError
from .generate import Request, Stats, generate
from .perf_model import Bandwidths, memory_bandwidth, predicted_seconds
from .plan import OffloadOptions, human
from .prefetch import GuessRecorder
from .quant import MODES


def parse_sweep(name: str, value: str | None) -> list:
    """'1,2,4' -> [1, 2, 4]; 'on,off' -> [True, False]; None -> [None] (the default)."""
    if value is None:
        return [None]
    items = [v.strip() for v in str(value).split(",")]
    option = "--" + name.replace("_", "-")
    if not all(items):
        raise MoelocalError(f"{option} '{value}': an empty item in the list")
    if name in ("cache_experts", "threads", "prefetch_depth"):
        low = 0 if name == "cache_experts" else 1
        try:
            numbers = [int(v) for v in items]
        except ValueError:
            numbers = []
        if not numbers or min(numbers) < low:
            raise MoelocalError(f"{option} '{value}': whole numbers >= {low}, comma-separated")
        return numbers
    if name == "quant" and any(v not in MODES for v in items):
        raise MoelocalError(f"{option} '{value}': {', '.join(MODES)}, comma-separated")
    if name == "prefetch":
        flags = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
        if any(v.lower() not in flags for v in items):
            raise MoelocalError(f"--prefetch '{value}': on or off, comma-separated")
        return [flags[v.lower()] for v in items]
    return items


def configurations(sweeps: dict[str, str | None]) -> list[dict]:
    """The cartesian product of every swept option: one bench row each."""
    names = list(sweeps)
    values = [parse_sweep(name, sweeps[name]) for name in names]
    configs = [
        {k: v for k, v in zip(names, combo, strict=True) if v is not None}
        for combo in itertools.product(*values)
    ]
    offload = {f.name for f in fields(OffloadOptions)}
    for config in configs:  # every row's options checked as load() will, before the first runs
        OffloadOptions(**{k: v for k, v in config.items() if k in offload})
    return configs


def one_run(engine: Engine, ids: list[int], gen_tokens: int, trace=None) -> dict:
    """One prefill + decode; expert figures for the decode alone (the prefill sees every expert).
    trace: a RoutingTrace that records the decode's routing and the prefetcher's guesses (which
    slow this run down)."""
    stats = Stats()
    ec, model = engine.expert_cache, engine.model
    prefetcher, after_prefill = model.prefetcher, None
    margin = prefetcher.margin if prefetcher is not None else OffloadOptions.prefetch_margin
    try:
        for i, _ in enumerate(generate(model, [Request(ids, gen_tokens)], stats=[stats])):
            if i == 0 and ec is not None:
                after_prefill = ec.stats.copy()
                ec.trace = trace
                if trace is not None:
                    model.prefetcher = GuessRecorder(prefetcher, trace, sorted(ec.slots),
                                                     margin, model.route_predictors,
                                                     model)  # fmt: skip
    finally:
        model.prefetcher = prefetcher
        if ec is not None:
            ec.trace = None
    decode = ec.stats.since(after_prefill).total() if ec is not None else None
    return {"stats": stats, "decode": decode}


def bench_config(model, config: dict, *, device, dtype, prompt_tokens, gen_tokens, repetitions,
                 context=None, trace=None) -> dict:  # fmt: skip
    options = dict(config)
    options.setdefault("context", context or prompt_tokens + gen_tokens)
    reset_peak_memory()  # each row's peak is its own, not the sweep's so far
    with load(model, device=device, dtype=dtype, **options) as engine:
        return measure(engine, config, prompt_tokens, gen_tokens, repetitions, trace)


def measure(engine: Engine, config: dict, prompt_tokens: int, gen_tokens: int,
            repetitions: int, trace=None) -> dict:  # fmt: skip
    """One bench row on a loaded engine; trace (a RoutingTrace) records its first run's decode."""
    engine.check_context(prompt_tokens, gen_tokens)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, engine.config.vocab_size, (prompt_tokens,), generator=gen).tolist()
    one_run(engine, ids[:16], 2)  # warm-up: kernels, allocator, the cache's first fill
    if trace is not None:
        cfg, ec = engine.config, engine.expert_cache
        trace.header |= {"model": engine.model_dir.name, "experts": cfg.num_experts,
                         "top_k": cfg.num_experts_per_tok,
                         "moe_layers": sorted(ec.slots) if ec else []}  # fmt: skip
    runs = [one_run(engine, ids, gen_tokens, trace if r == 0 else None)
            for r in range(repetitions)]  # fmt: skip

    def mean_std(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    prefill = mean_std([r["stats"].prefill_tokens_per_s for r in runs])
    decode = mean_std([r["stats"].decode_tokens_per_s for r in runs])
    row = {
        "model": str(engine.model_dir.name),
        "device": engine.device.type,
        "dtype": str(engine.plan.dtype).removeprefix("torch."),
        "quant": engine.plan.quant,
        "kernel": engine.kernel,
        "threads": engine.threads,
        "gpu_mem": config.get("gpu_mem"),
        "cpu_mem": config.get("cpu_mem"),
        "cache_experts": engine.plan.device_slots,
        "cache_slots": engine.plan.cache_slots,  # in all: some layers may have one more
        "cache_policy": config.get("cache_policy", "learned"),
        "prefetch": config.get("prefetch", True),
        "prefetch_depth": config.get("prefetch_depth", 1),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": prefill[0],
        "prefill_tok_s_std": prefill[1],
        "decode_tok_s": decode[0],
        "decode_tok_s_std": decode[1],
        "ttft_ms": statistics.fmean(r["stats"].prefill_s for r in runs) * 1000,
    }
    memory = engine.memory()
    row |= {
        "peak_rss_bytes": memory["peak_rss_bytes"],
        "peak_gpu_bytes": memory.get("peak_gpu_bytes"),
    }
    steps = sum(r["stats"].generated_tokens - 1 for r in runs)
    decode_s = sum(r["stats"].decode_s for r in runs)
    ec = engine.expert_cache
    if ec is None or steps == 0:
        return row | {"floor_tok_s": None}
    d = runs[0]["decode"]
    for r in runs[1:]:
        d.add(r["decode"])
    disk_bytes, host_bytes = d.bytes_from_disk / steps, d.bytes_from_host / steps
    # (all resident, nothing moves and the disk's rate is never used: not measured)
    rates = Bandwidths(memory_bandwidth(engine.device),
                       ec.bandwidth("disk") if disk_bytes or ec.streaming else 1.0,
                       ec.bandwidth("host") if ec.mover.host_experts else 0.0)  # fmt: skip
    io_s = disk_bytes / rates.disk + (host_bytes / rates.host if host_bytes else 0.0)
    compute_s = max(0.0, decode_s - d.stall_s) / steps  # decode time not spent waiting
    floor_s = max(compute_s, io_s)
    summary = d.summary(ec.expert_bytes)
    return row | {
        "hit_rate": summary["hit_rate"],
        "prefetch_precision": summary["prefetch_precision"],
        "prefetch_recall": summary["prefetch_recall"],
        "bytes_moved_per_token": summary["bytes_moved"] / steps,
        "stall_share": d.stall_s / decode_s if decode_s else 0.0,
        "floor_tok_s": 1 / floor_s if floor_s else None,
        # the plan's performance model at this run's hit rate (perf_model.py)
        "predicted_tok_s": 1 / predicted_seconds(engine.plan, summary["hit_rate"], rates),
    }


def onoff(flag: bool) -> str:
    return "on" if flag else "off"


def report_table(rows: list[dict]):
    """Configuration columns that vary or were set, then the measurements."""
    first = rows[0]
    table = Table(title=f"{first['model']} ({first['device']}, {first['dtype']}): "
                  f"pp{first['prompt_tokens']} tg{first['gen_tokens']}")  # fmt: skip
    config = [("quant", "quant"), ("gpu mem", "gpu_mem"), ("cpu mem", "cpu_mem"),
              ("slots", "cache_experts"), ("policy", "cache_policy"),
              ("prefetch", "prefetch"), ("depth", "prefetch_depth")]  # fmt: skip
    config = [(name, key) for name, key in config if any(r[key] != first[key] for r in rows)
              or first[key] not in (None, "lru", True, "none", 1)]  # fmt: skip
    config += [("kernel", "kernel"), ("threads", "threads")]  # as llama-bench shows them

    def pct(row, key):
        return f"{row[key]:.0%}" if row.get(key) is not None else "-"

    def size(row, key):
        return human(row[key]) if row.get(key) else "-"

    measures = {
        "pp tok/s": lambda r: f"{r['prefill_tok_s']:.1f} ± {r['prefill_tok_s_std']:.1f}",
        "tg tok/s": lambda r: f"{r['decode_tok_s']:.2f} ± {r['decode_tok_s_std']:.2f}",
        "ttft": lambda r: f"{r['ttft_ms']:.0f} ms",
        "hit": lambda r: pct(r, "hit_rate"),
        "prefetch prec/recall": lambda r: (
            f"{pct(r, 'prefetch_precision')} / {pct(r, 'prefetch_recall')}"
        ),
        "moved/tok": lambda r: size(r, "bytes_moved_per_token") if "hit_rate" in r else "-",
        "stalled": lambda r: pct(r, "stall_share"),
        "peak RAM": lambda r: size(r, "peak_rss_bytes"),
        "floor tg": lambda r: f"{r['floor_tok_s']:.1f}" if r.get("floor_tok_s") else "-",
        "predicted": lambda r: f"{r['predicted_tok_s']:.1f}" if r.get("predicted_tok_s") else "-",
    }
    if first["device"] == "cuda":
        measures["peak GPU"] = lambda r: size(r, "peak_gpu_bytes")
    for name in [name for name, _ in config] + list(measures):
        table.add_column(name, justify="right")
    for r in rows:
        cells = [onoff(r[key]) if isinstance(r[key], bool) else str(r[key] or "-")
                 for _, key in config]  # fmt: skip
        table.add_row(*cells, *(fn(r) for fn in measures.values()))
    return table
