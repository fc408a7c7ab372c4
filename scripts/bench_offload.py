"""Offloaded decode under a memory cap that counts the page cache: moelocal with prefetch, moelocal
without prefetch, and transformers + accelerate offloading, on one checkpoint, in one run.

    python scripts/bench_offload.py                                  # mixtral-medium, 1024 MiB
    python scripts/bench_offload.py cache/models/mixtral-large --cap 2048 --gen-tokens 16

Each engine runs in its own process under ../shared/tools/memcap.sh (cgroup v1, as root), which
first evicts the model's pages from the page cache. The floor is the time per token that the disk
allows (bytes read per token ÷ measured disk bandwidth) or the compute time with every weight
resident, whichever is larger (DESIGN.md's performance model). Needs the test extras
(transformers, accelerate).
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MEMCAP = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "memcap.sh"
# what the process itself takes before any weight (Python, torch, kernels): outside --cpu-mem
PROCESS_OVERHEAD_MIB = 320


def prompt_ids(n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def run_moelocal(args) -> dict:
    import moelocal

    options = dict(context=args.prompt_tokens + args.gen_tokens + 8, prefetch=args.prefetch)
    if args.cpu_mem:
        options["cpu_mem"] = f"{args.cpu_mem}MiB"
    engine = moelocal.load(args.model, device="cpu", **options)
    engine.stop_ids = set()
    ids = prompt_ids(args.prompt_tokens, engine.config.vocab_size)
    engine.generate(ids, max_new_tokens=2)  # warm-up
    out = engine.generate(ids, max_new_tokens=args.gen_tokens)
    s, experts = out.stats, out.stats.extra["experts"]
    return {
        "decode_tok_s": s.decode_tokens_per_s,
        "slots_per_layer": engine.plan.device_slots,
        "hit_rate": experts["hit_rate"],
        "prefetch_precision": experts["prefetch_precision"],
        "prefetch_recall": experts["prefetch_recall"],
        "bytes_read_per_token": experts["bytes_from_disk"] / max(1, s.generated_tokens),
        "stall_share": experts["stall_s"] / max(1e-9, s.prefill_s + s.decode_s),
        "peak_rss_mib": out.stats.extra["memory"]["peak_rss_bytes"] / 2**20,
        "expert_bytes": experts["expert_bytes"],
    }


def run_accelerate(args) -> dict:
    import transformers

    with tempfile.TemporaryDirectory() as offload:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, device_map="auto", max_memory={"cpu": f"{args.cpu_mem}MiB"},
            offload_folder=offload, dtype=torch.bfloat16,
        ).eval()  # fmt: skip
        ids = torch.tensor([prompt_ids(args.prompt_tokens, model.config.vocab_size)])

        def timed(n):
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - start

        timed(1)
        one, full = timed(1), timed(args.gen_tokens)
    return {"decode_tok_s": (args.gen_tokens - 1) / (full - one)}


def disk_bandwidth(model_dir: Path, read_bytes: int) -> float:
    """Bytes/s of O_DIRECT reads the size of one expert matrix on IO_THREADS threads (the disk
    tier's own access pattern), the better of scattered and in-order offsets: a floor is a bound
    no engine can beat, so it takes the most the disk gave."""
    from concurrent.futures import ThreadPoolExecutor

    from moelocal.direct_io import ALIGN, IO_THREADS
    from moelocal.store import aligned_buffer

    path = max(model_dir.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    chunk = read_bytes - read_bytes % ALIGN
    slots = path.stat().st_size // chunk - 1
    offsets = [(i * 7919 % slots) * chunk for i in range(96)]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffers = [aligned_buffer(chunk) for _ in range(IO_THREADS)]

    def read(i):
        buf, base = buffers[i % IO_THREADS]
        return os.preadv(fd, [(ctypes.c_char * chunk).from_address(buf.data_ptr() + base)],
                         offsets[i])  # fmt: skip

    rates = []
    for order in (offsets, sorted(offsets)):
        offsets[:] = order
        start = time.perf_counter()
        with ThreadPoolExecutor(IO_THREADS) as pool:
            total = sum(pool.map(read, range(len(offsets))))
        rates.append(total / (time.perf_counter() - start))
    os.close(fd)
    return max(rates)


def child(engine: str, args, cap_mib: int | None) -> dict:
    cmd = [sys.executable, __file__, str(args.model), "--run", engine,
           "--gen-tokens", str(args.gen_tokens),
           "--prompt-tokens", str(args.prompt_tokens)]  # fmt: skip
    if cap_mib:
        cmd += ["--cpu-mem", str(cap_mib - PROCESS_OVERHEAD_MIB)]
        cmd = ["bash", str(MEMCAP), str(cap_mib), str(args.model), "--", *cmd]
    if engine == "moelocal-noprefetch":
        cmd.append("--no-prefetch")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--cap", type=int, default=1024, help="memory cap in MiB")
    parser.add_argument("--gen-tokens", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-mem", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    args = parser.parse_args()
    if args.model is None:
        from moelocal.hub import data_dir
        from moelocal.synthetic import make_checkpoint

        args.model = data_dir() / "models" / "mixtral-medium"
        if not args.model.exists():
            make_checkpoint(args.model, "mixtral-medium")
    if args.run:  # a child process: one engine, one JSON line
        result = run_accelerate(args) if args.run == "accelerate" else run_moelocal(args)
        print(json.dumps(result))
        return

    compute = child("moelocal", args, None)  # uncapped, all resident: the compute floor
    bandwidth = disk_bandwidth(args.model, compute["expert_bytes"] // 3)
    rows = {name: child(name, args, args.cap)
            for name in ("moelocal", "moelocal-noprefetch", "accelerate")}  # fmt: skip
    compute_s = 1 / compute["decode_tok_s"] if "decode_tok_s" in compute else 0.0
    print(f"model {args.model}, cap {args.cap} MiB, disk {bandwidth / 1e9:.2f} GB/s (O_DIRECT, "
          f"scattered reads of one expert matrix), "
          f"resident compute {1 / compute_s if compute_s else 0:.1f} tok/s")  # fmt: skip
    header = ("engine", "tok/s", "slots", "hit", "prec", "recall", "MB read/tok", "floor tok/s",
              "time/floor", "stall", "peak RSS")  # fmt: skip
    print("  ".join(f"{h:>11}" for h in header))
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:>11}  error: {r['error']}")
            continue
        cells = [name, f"{r['decode_tok_s']:.2f}"]
        if "hit_rate" in r:
            floor_s = max(compute_s, r["bytes_read_per_token"] / bandwidth)
            cells += [r["slots_per_layer"], f"{r['hit_rate']:.2f}",
                      f"{r['prefetch_precision']:.2f}",
                      f"{r['prefetch_recall']:.2f}", f"{r['bytes_read_per_token'] / 1e6:.1f}",
                      f"{1 / floor_s:.2f}", f"{1 / (floor_s * r['decode_tok_s']):.2f}x",
                      f"{r['stall_share']:.0%}", f"{r['peak_rss_mib']:.0f} MiB"]  # fmt: skip
        print("  ".join(f"{c:>11}" for c in map(str, cells)))
    base = rows["accelerate"].get("decode_tok_s")
    if base and "decode_tok_s" in rows["moelocal"]:
        print(f"moelocal (prefetch) / accelerate: {rows['moelocal']['decode_tok_s'] / base:.1f}x")


if __name__ == "__main__":
    main()
