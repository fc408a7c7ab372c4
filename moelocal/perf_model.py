"""DESIGN.md's performance model, with the bandwidths it needs measured on this machine in a
fraction of a second: a decoded token takes about the weights it reads (every resident matrix and
its top k experts per MoE layer) at the compute device's memory bandwidth, plus a fixed cost per
layer, plus the experts it misses at the rate they come in (from the host store over PCIe on
CUDA, else from disk). No overlap of loads with compute is assumed: prefetch is what beats it.
"""

import functools
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .direct_io import ALIGN, IO_THREADS, open_uncached, read_fully
from .model_files import EXPERTS

# what a decoder layer's decode step costs besides reading its weights (Python, dispatch, the
# small ops): the default model decodes 362 tok/s all resident on a 2-core Sapphire Rapids, 2.76
# ms a token for 6 layers, 0.26 ms of it reading weights at the measured memory bandwidth
LAYER_OVERHEAD_S = 0.4e-3
SAMPLE_BYTES = 256 * 2**20  # memory read to measure its bandwidth
DISK_SAMPLE_BYTES = 128 * 2**20  # at most this much read from the model to measure the disk


@dataclass
class Bandwidths:
    memory: float  # bytes/s the compute device reads its own memory at
    disk: float  # bytes/s whole experts are read from the model's files at
    host: float = 0.0  # bytes/s from page-locked RAM into the GPU (CUDA)


def predicted_seconds(plan, hit_rate: float, bw: Bandwidths) -> float:
    """Seconds a decoded token takes under `plan` at this hit rate: the weights it reads, then
    its misses, the host store's share of them at the copy rate and the rest from disk."""
    if plan.device_slots >= plan.n_experts:  # every expert has its slot: nothing moves
        hit_rate = 1.0
    compute = plan.bytes_read_per_token() / bw.memory + plan.layers * LAYER_OVERHEAD_S
    on_host = plan.host_experts / plan.total_experts if plan.total_experts and bw.host else 0.0
    missed = plan.bytes_moved_per_token(hit_rate)
    moved = missed * on_host / bw.host if on_host else 0.0
    return compute + moved + missed * (1 - on_host) / bw.disk


def measure(plan, model_dir: Path) -> Bandwidths:
    """The bandwidths a plan's decode depends on, measured now."""
    device = torch.device(plan.device)
    host = host_to_device_bandwidth(device) if plan.host_experts else 0.0
    disk = disk_bandwidth(expert_file(model_dir), plan.expert_bytes)
    return Bandwidths(memory_bandwidth(device), disk, host)


@functools.cache
def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of one pass over SAMPLE_BYTES of the device's memory (the best of three; measured
    once a process)."""
    buf = torch.ones(SAMPLE_BYTES // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        buf.sum().item()  # .item() waits for a GPU
        best = min(best, time.perf_counter() - start)
    return SAMPLE_BYTES / best


def host_to_device_bandwidth(device: torch.device) -> float:
    """Bytes/s of a copy from page-locked RAM into the GPU."""
    src = torch.empty(SAMPLE_BYTES // 4, dtype=torch.uint8).pin_memory()
    dest = torch.empty_like(src, device=device)
    dest.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    dest.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return src.numel() / (time.perf_counter() - start)


def expert_file(model_dir: Path) -> Path:
    """The file the experts are read from: a converted model's experts.bin, else its largest
    safetensors shard."""
    converted = Path(model_dir) / EXPERTS
    if converted.is_file():
        return converted
    shards = list(Path(model_dir).glob("*.safetensors"))
    return max(shards, key=lambda p: p.stat().st_size)


def disk_bandwidth(path: Path, expert_bytes: int) -> float:
    """Bytes/s of expert-sized reads spread over the file, IO_THREADS at a time, as the disk
    tier reads them (bypassing the page cache where the file system allows)."""
    size = os.path.getsize(path)
    chunk = max(ALIGN, min(expert_bytes, DISK_SAMPLE_BYTES // IO_THREADS, size) // ALIGN * ALIGN)
    n = max(1, min(2 * IO_THREADS, DISK_SAMPLE_BYTES // chunk, size // chunk))
    offsets = [(size - chunk) * i // n // ALIGN * ALIGN for i in range(n)]
    fd, direct = open_uncached(path)
    local = threading.local()

    def make_buffer():  # page-aligned, as O_DIRECT asks, its pages faulted in before the clock
        local.buf = mmap.mmap(-1, chunk)
        local.buf.write(bytes(chunk))

    def read(offset: int):
        read_fully(fd, direct, memoryview(local.buf), offset, chunk)

    try:
        with ThreadPoolExecutor(IO_THREADS, initializer=make_buffer) as pool:
            ready = threading.Barrier(IO_THREADS)  # every thread up, its buffer made
            list(pool.map(lambda _: ready.wait(), range(IO_THREADS)))
            start = time.perf_counter()
            list(pool.map(read, offsets))
            seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return n * chunk / seconds
