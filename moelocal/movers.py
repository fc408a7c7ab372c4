"""Movers: how one expert gets into a slot of the expert cache, per device.

A mover makes a `Load` for (layer, expert, slot); the expert cache starts it at a priority and
later waits for it. The CPU mover reads from disk straight into the slot. The CUDA mover copies
from its host store (experts kept in page-locked RAM) on a copy stream, or reads from disk into
a page-locked staging piece and copies that. Neither decides what to load (expert_cache.py).
"""

import mmap
import threading
import time
import weakref

import torch

from .direct_io import IO_THREADS
from .errors import MoelocalError
from .io_queue import DEMAND, IOQueue, Job
from .store import DiskReader


class Load:
    """One expert on its way into a slot: a read on the I/O queue, a copy on a CUDA stream, or
    a read followed by a copy (the job's result is then the copy's event)."""

    def __init__(self, queue: IOQueue | None, job: Job | None, event=None, source: str = "disk"):
        self.queue, self.job, self.event, self.source = queue, job, event, source

    def start(self, priority: int = DEMAND):
        if self.job is not None:
            self.queue.put(self.job, priority)

    def promote(self):
        if self.job is not None:
            self.queue.promote(self.job)

    def drop(self) -> bool:
        """Cancel a load that has not started, or a guess's read halfway (its slot is then
        written until done()); False for one that will land."""
        return self.job is not None and self.queue.drop(self.job)

    def settle(self):
        """Drop it, and wait until nothing of it runs; errors ignored."""
        self.drop()
        if self.job is not None and not self.job.done():
            self.job.finished.wait()
        event = self._event()
        if event is not None:
            event.synchronize()

    def head_start(self, now: float, whole: float) -> float:
        """Seconds of this load done by `now` (perf_counter); `whole` for a landed copy that
        was not timed."""
        if self.job is not None:
            return self.job.ran_for(now)
        return whole if self.done() else 0.0

    def done(self) -> bool:
        """Nothing of it runs any more (landed, failed, dropped or never started)."""
        if self.job is not None and not self.job.done():
            return False
        event = self._event()
        return event is None or event.query()

    def ok(self) -> bool:
        """Done and landed: the slot holds the expert."""
        return self.done() and (self.job is None or self.job.state == "done" and not self.job.error)

    def wait(self):
        """Block until the expert may be read by compute on the current stream; a failed read
        raises here."""
        if self.job is not None:
            self.job.wait()
        event = self._event()
        if event is not None:  # compute waits on the copy's event, not on a global synchronize
            torch.cuda.current_stream().wait_event(event)

    def _event(self):
        if self.event is None and self.job is not None and self.job.state == "done":
            if isinstance(self.job.result, torch.cuda.Event):
                self.event = self.job.result
        return self.event


class CpuMover:
    """Disk -> a slot in RAM, through the I/O queue."""

    device = torch.device("cpu")
    host_experts = 0

    def __init__(self, reader: DiskReader, queue: IOQueue):
        self.reader, self.queue = reader, queue
        self.written: set[int] = set()  # the slots' memory read into before (their addresses)

    def load(self, layer: int, e: int, dest: torch.Tensor) -> Load:
        job = Job(self.reader.read, layer, e, dest)
        job.first_touch = dest.data_ptr() not in self.written
        self.written.add(dest.data_ptr())
        return Load(self.queue, job)

    def on_host(self, layer: int, e: int, n_tokens: int) -> bool:
        return False  # RAM is the device here

    def load_seconds(self) -> tuple[float, float]:
        """How long a miss's load of one expert takes now, and the CPU time a load takes from
        compute (all of its own: compute keeps every core busy). 0 until one has been read."""
        return self.queue.job_s, self.queue.job_cpu_s

    def bandwidth(self, source: str, n_experts: int = 8) -> float:
        """Bytes/s of whole-expert reads from disk through the queue, IO_THREADS at a time."""
        keys = sorted(self.reader.pieces)
        keys = keys[:: max(1, len(keys) // n_experts)][:n_experts]
        nbytes = self.reader.layout.nbytes
        blobs = [torch.empty(nbytes, dtype=torch.uint8) for _ in keys]
        start = time.perf_counter()
        jobs = [
            self.queue.put(Job(self.reader.read, *k, b)) for k, b in zip(keys, blobs, strict=True)
        ]
        for job in jobs:
            job.wait()
        return len(keys) * nbytes / (time.perf_counter() - start)

    def close(self):
        self.queue.close()
        self.reader.close()


class PinnedArena:
    """Host RAM page-locked once and carved into equal pieces: an anonymous memory map
    registered with cudaHostRegister. PyTorch's pinned allocator would round every block up to a
    power of two (a 336 MiB expert takes 512 MiB); an ordinary allocation may share a page with
    another arena's, and registration, by whole pages, then fails. Unregistered on close() or
    when the arena is collected."""

    def __init__(self, n_pieces: int, piece_bytes: int):
        size = n_pieces * piece_bytes
        memory = mmap.mmap(-1, max(size, 1))  # page-aligned, its pages its own
        self.buf = torch.frombuffer(memory, dtype=torch.uint8)[:size]
        self.pieces = list(self.buf.split(piece_bytes)) if n_pieces else []
        self.registered = False
        if n_pieces:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self.buf.data_ptr(), size, 0)
            if int(err) != 0:
                raise MoelocalError(
                    f"could not page-lock {size} bytes of host RAM for the expert cache "
                    f"(CUDA error {int(err)}); lower --cpu-mem"
                )
            self.registered = True
            self._unregister = weakref.finalize(self, cudart.cudaHostUnregister,
                                                self.buf.data_ptr())  # fmt: skip
            self._unregister.atexit = False  # the process's memory goes anyway

    def close(self):
        if self.registered:
            self._unregister()
            self.registered = False


class CudaMover:
    """Host store (page-locked) or disk -> a slot in GPU memory, copied on a stream of its own.

    The host store holds the first `host_experts // n_layers` experts of every MoE layer, read at
    start-up. A miss whose expert is in the host store may be computed on the CPU instead, where
    its weights are (`on_host`): a deterministic choice, `cpu_miss_tokens` or fewer tokens."""

    def __init__(
        self, reader: DiskReader, queue: IOQueue, device: torch.device, moe_layers: list[int],
        host_experts: int, cpu_miss_tokens: int,
    ):  # fmt: skip
        self.reader, self.queue, self.device = reader, queue, device
        self.cpu_miss_tokens = cpu_miss_tokens
        self.host_copy_s = None
        nbytes = reader.layout.nbytes
        per_layer = min(host_experts, len(reader.pieces)) // max(1, len(moe_layers))
        self.host_experts = per_layer * len(moe_layers)
        self.copy_stream = torch.cuda.Stream(device)
        self.host_arena = PinnedArena(self.host_experts, nbytes)
        self.staging_arena = PinnedArena(IO_THREADS, nbytes)  # one per I/O thread
        self.staging = threading.local()
        self.next_staging = iter(self.staging_arena.pieces)
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        pieces = iter(self.host_arena.pieces)
        try:
            jobs = []
            for layer in moe_layers:
                for e in range(per_layer):
                    blob = self.host[layer, e] = next(pieces)
                    jobs.append(queue.put(Job(reader.read, layer, e, blob)))
            for job in jobs:
                job.wait()
        except BaseException:
            queue.close()  # no read may still write into the arena
            self.host_arena.close()
            self.staging_arena.close()
            raise

    def load(self, layer: int, e: int, dest: torch.Tensor) -> Load:
        # the copy must not overwrite a slot that compute queued before now may still read
        compute_done = torch.cuda.current_stream(self.device).record_event()
        src = self.host.get((layer, e))
        if src is None:
            job = Job(self._disk_to_device, layer, e, dest, compute_done)
            return Load(self.queue, job)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(compute_done)
            dest.copy_(src, non_blocking=True)
            return Load(None, None, self.copy_stream.record_event(), source="host")

    def _disk_to_device(self, layer, e, dest, compute_done):
        """I/O thread: disk -> this thread's staging piece -> slot, on the copy stream."""
        if not hasattr(self.staging, "piece"):
            self.staging.piece = next(self.next_staging)
        staging = self.reader.read(layer, e, self.staging.piece)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(compute_done)
            dest.copy_(staging, non_blocking=True)
            done = self.copy_stream.record_event()
        done.synchronize()  # the staging piece is reused by this thread's next read
        return done

    def on_host(self, layer: int, e: int, n_tokens: int) -> bool:
        """Compute this miss on the CPU from the host store instead of copying it."""
        return n_tokens <= self.cpu_miss_tokens and (layer, e) in self.host

    def load_seconds(self) -> tuple[float, float]:
        """How long loading one expert takes now, on average over where the experts are: a copy
        from the host store (measured once) or a disk read and its copy (as recently measured);
        and the time it takes from compute, none: the GPU computes."""
        on_host = self.host_experts / len(self.reader.pieces)
        if on_host and self.host_copy_s is None:
            self.host_copy_s = self.reader.layout.nbytes / self.bandwidth("host")
        return on_host * (self.host_copy_s or 0.0) + (1 - on_host) * self.queue.job_s, 0.0

    def host_views(self, layer: int, e: int) -> dict:
        return self.reader.layout.views(self.host[layer, e])

    def bandwidth(self, source: str) -> float:
        """Bytes/s into a GPU slot from "host" (a copy from page-locked RAM) or "disk" (a read
        into a staging piece, then its copy)."""
        nbytes = self.reader.layout.nbytes
        dest = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        keys = sorted(self.reader.pieces)[:4]
        src = self.staging_arena.pieces[0]
        start = time.perf_counter()
        for layer, e in keys:
            if source == "host":
                dest.copy_(src, non_blocking=True)
            else:
                load = Load(
                    self.queue,
                    Job(
                        self._disk_to_device,
                        layer,
                        e,
                        dest,
                        torch.cuda.current_stream(self.device).record_event(),
                    ),
                )
                load.start()
                load.wait()
        torch.cuda.synchronize(self.device)  # a measurement, not the decode path
        return len(keys) * nbytes / (time.perf_counter() - start)

    def close(self):
        self.queue.close()
        torch.cuda.synchronize(self.device)  # no copy may still read the arenas
        self.host_arena.close()
        self.staging_arena.close()
        self.reader.close()
