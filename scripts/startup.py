"""What a user waits for before the first token, measured in one run: the CLI's answer, the disk's
direct-I/O bandwidth against the rate experts are preloaded at, loading, the first token, and
`moelocal generate -n 1` from launch to exit.

    python scripts/startup.py cache/models/mixtral-large-int4     # a converted model
    python scripts/startup.py cache/models/mixtral-large-int4 --rounds 3

Each load runs in a fresh process, as `moelocal chat` would. The direct-I/O bandwidth reads the
model's experts.bin (or its safetensors files) with O_DIRECT in expert-sized pieces on as many
threads as the expert reader uses, in the same run, so the ratio holds on any disk.
"""

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# as `moelocal generate` runs: the experts' reads start before torch is imported (preread.py)
CHILD = r"""
import json, sys, time
start = time.perf_counter()
from moelocal import preread
early = preread.start(sys.argv[1], "cpu")
import torch
imported = time.perf_counter()
import moelocal
engine = moelocal.load(sys.argv[1], device="cpu", preread=early)
loaded = time.perf_counter()
ids = engine.chat_prompt([{"role": "user", "content": "Hello!"}])
out = engine.generate(ids, max_new_tokens=1)
first = time.perf_counter()
ec = engine.expert_cache
# the resident part's one full pass (its CRC32; the weights are then assigned from safetensors'
# memory map) against a plain read of the same file from the page cache
from moelocal.checkpoint import Checkpoint
from moelocal.model_files import RESIDENT
resident = engine.model_dir / RESIDENT
t = time.perf_counter()
Checkpoint(engine.model_dir).close()
checked = time.perf_counter() - t
t = time.perf_counter()
with open(resident, "rb") as f:
    while f.read(1 << 24):
        pass
plain = time.perf_counter() - t
print(json.dumps({
    "resident_bytes_per_s": resident.stat().st_size / checked,
    "page_cache_read_bytes_per_s": resident.stat().st_size / plain,
    "torch_import_s": imported - start, "load_s": loaded - imported,
    "first_token_s": first - loaded, "prefill_s": out.stats.prefill_s,
    "prompt_tokens": len(ids), "total_s": first - start,
    "preload_bytes": ec.stats.preload_bytes if ec else 0,
    "preload_s": ec.stats.preload_s if ec else 0.0,
}))
"""


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - start


def direct_io_bandwidth(files: list[Path], piece: int, threads: int) -> float:
    """Bytes/s of O_DIRECT reads of `piece` bytes over the files, `threads` at a time."""
    local = threading.local()
    jobs = []
    for path in files:
        size = path.stat().st_size
        jobs += [(path, off, min(piece, size - off)) for off in range(0, size, piece)]
    fds = {path: os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for path in files}

    def read(job):
        path, off, n = job
        if not hasattr(local, "buf"):
            local.buf = mmap.mmap(-1, piece + 4096)
        length = n + (-n) % 4096
        return os.preadv(fds[path], [memoryview(local.buf)[:length]], off)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, jobs))
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return total / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from moelocal.direct_io import IO_THREADS

    cli = [sys.executable, "-m", "moelocal.cli"]
    manifest = args.model / "moelocal.json"
    expert_bytes = json.loads(manifest.read_text())["expert_bytes"] if manifest.is_file() else 0
    files = sorted(args.model.glob("*.safetensors"))
    if expert_bytes:  # converted: the experts' file
        files = [args.model / "experts.bin"]
    piece = expert_bytes or 16 << 20
    rows = []
    for _ in range(args.rounds):  # alternating: the disk's rate, then a load
        row = {"help_s": wall([*cli, "--help"]), "list_s": wall([*cli, "list"])}
        # what a user waits for: from the command to its exit after one token of the same prompt
        row["cli_one_token_s"] = wall([*cli, "generate", str(args.model), "--device", "cpu",
                                       "--prompt", "Hello!", "-n", "1"])  # fmt: skip
        row["direct_io_bytes_per_s"] = direct_io_bandwidth(files, piece, IO_THREADS)
        child = subprocess.run([sys.executable, "-c", CHILD, str(args.model)],
                               capture_output=True, text=True, check=True)  # fmt: skip
        row |= json.loads(child.stdout.strip().splitlines()[-1])
        if row["preload_s"]:
            row["preload_bytes_per_s"] = row["preload_bytes"] / row["preload_s"]
            row["preload_vs_direct_io"] = row["preload_bytes_per_s"] / row["direct_io_bytes_per_s"]
        rows.append(row)
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    for key, value in median.items():
        if key.endswith("bytes_per_s"):
            print(f"{key[: -len('_bytes_per_s')]:>24}: {value / 1e9:.2f} GB/s")
        elif key.endswith("_s"):
            print(f"{key:>24}: {value:.2f} s")
        else:
            print(f"{key:>24}: {value:.3g}")


if __name__ == "__main__":
    main()
