"""A converted model's experts read while the rest of moelocal starts, into the memory that becomes
the expert cache's slots.

Before the expert cache can preload, `moelocal chat` imports torch (0.75 s here), plans the model
and loads its resident part (0.2 s). The preload's reads (1.6 s for mixtral-large int4) need none
of that: the manifest holds every expert's offset and checksum, and a slot is page-aligned memory.
So the CLI starts them first (this module does not import torch), in the order the cache preloads
(slot s of every layer before slot s + 1), and the cache takes the memory over as its slots.

They start only where the cache's size is known beforehand: on the CPU without --cpu-mem (every
expert gets a slot, or --cache-experts N), and where those slots, the resident part and torch fit
in the memory free to the process (memory_room.py; else the plan will choose fewer slots).
The loader stays the judge: the cache takes a preread over only if every expert's file, offset,
size and checksum are the ones it planned (else it is closed and its memory freed); rows the
cache has no slot for are released; an expert whose read failed or whose checksum did not match
is read again by the cache's own reader, whose error names it. Nothing here reports an error:
the load that follows does.
"""

import json
import mmap
import os
import time
from pathlib import Path

from . import memory_room
from .crc import crc32
from .direct_io import ALIGN, IO_THREADS, open_uncached, read_fully
from .errors import MoelocalError
from .hub import DEFAULT_MODEL, resolve_model
from .io_queue import IOQueue, Job
from .model_files import EXPERTS, MANIFEST, PARTIAL, RESIDENT, model_file

GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/kfd")  # where device "auto" may pick a GPU
TORCH_ROOM = 512 * 2**20  # what importing torch and the kernels will take beside the reads


class ExpertPreread:
    """Expert s of every MoE layer read into row s of that layer's memory, slot by slot, on
    threads of its own."""

    def __init__(self, model_dir: Path, slots: int | None = None):
        manifest = json.loads(model_file(model_dir, MANIFEST).read_text())
        self.path = model_file(model_dir, EXPERTS)
        self.nbytes = manifest["expert_bytes"]
        # (layer, expert) -> (offset, crc32), as the manifest has them
        self.entries = {
            tuple(int(i) for i in key.split(".")): (entry["offset"], entry["crc32"])
            for key, entry in manifest["experts"].items()
        }
        if self.path is None or any(offset % ALIGN for offset, _ in self.entries.values()):
            raise ValueError("no experts.bin, or blobs not at block boundaries")
        layers = sorted({layer for layer, _ in self.entries})
        n_experts = 1 + max(e for _, e in self.entries)
        self.slots = n_experts if slots is None else min(slots, n_experts)
        self.row = -(-self.nbytes // ALIGN) * ALIGN
        resident = model_file(model_dir, RESIDENT)
        need = self.slots * len(layers) * self.row + TORCH_ROOM
        need += resident.stat().st_size if resident is not None else 0
        if need > memory_room.available():  # the plan will keep fewer slots: not known here
            raise ValueError("the experts do not fit the memory free to this process")
        self.started = time.perf_counter()
        # anonymous mappings: page-aligned, and pages exist only once a read lands in them
        self.memory = {layer: mmap.mmap(-1, self.slots * self.row) for layer in layers}
        self.fd, self.direct = open_uncached(self.path)
        self.queue = IOQueue(IO_THREADS, "moelocal-preread")
        self.jobs = {}  # slot s of every layer before slot s + 1, as the cache preloads
        for layer, slot in sorted(
            (k for k in self.entries if k[1] < self.slots), key=lambda k: k[::-1]
        ):
            self.jobs[layer, slot] = self.queue.put(Job(self._read, layer, slot))

    def _read(self, layer: int, slot: int) -> bool:
        """Expert `slot` of layer into its row; True when it landed whole and its CRC32 matches."""
        offset, expected = self.entries[layer, slot]
        with memoryview(self.memory[layer]) as whole:
            with whole[slot * self.row : (slot + 1) * self.row] as row:
                landed = read_fully(self.fd, self.direct, row, offset, self.nbytes)
                return landed and crc32(row[: self.nbytes]) == expected

    @property
    def bytes_read(self) -> int:
        """Bytes of the rows landed so far (in memory now)."""
        return sum(self.row for job in self.jobs.values() if job.finished.is_set() and job.result)

    def keep(self, pieces: dict, nbytes: int, n_slots: int) -> bool:
        """True when the cache will read exactly these experts (pieces: (layer, expert) -> the
        blob in experts.bin the loader planned) into n_slots slots of nbytes: rows past n_slots
        are then released. Otherwise everything is stopped and freed."""
        same = self.fd >= 0 and nbytes == self.nbytes and n_slots <= self.slots
        same = same and self._reads(pieces)
        self.release(n_slots if same else 0)
        if not same:
            self.close()
        return same

    def _reads(self, pieces: dict) -> bool:
        """Every planned expert is one blob, in our file, at the offset and with the CRC32 that
        this preread reads it with."""
        blobs = {k: parts[0] for k, parts in pieces.items() if len(parts) == 1}
        if not blobs.keys() == pieces.keys() == self.entries.keys():
            return False
        if not all(p.part == "blob" and (p.offset, p.crc32) == self.entries[k]
                   for k, p in blobs.items()):  # fmt: skip
            return False
        try:
            return all(
                os.path.samefile(path, self.path) for path in {p.path for p in blobs.values()}
            )
        except OSError:
            return False

    def release(self, n_slots: int):
        """Stop reading rows from n_slots on and give their memory back."""
        for (_, slot), job in self.jobs.items():
            if slot >= n_slots and not self.queue.drop(job):
                job.finished.wait()  # running: it finishes before its memory goes
        if n_slots < self.slots and hasattr(mmap, "MADV_DONTNEED"):
            for memory in self.memory.values():
                try:
                    start = n_slots * self.row
                    memory.madvise(mmap.MADV_DONTNEED, start, len(memory) - start)
                except (OSError, ValueError):  # pages larger than ALIGN: freed with the mapping
                    pass

    def landed(self, layer: int, slot: int) -> bool:
        """Wait for row `slot` of layer: True when it holds its expert, checked."""
        job = self.jobs.get((layer, slot))
        if job is None or slot >= self.slots:
            return False
        job.finished.wait()
        return job.state == "done" and job.error is None and bool(job.result)

    def close(self):
        """Drop the reads not started, wait for those running, close the file, and let go of the
        memory: it lives on only as the slots of a cache that took it (a preread serves once)."""
        if self.fd >= 0:
            self.queue.close()
            os.close(self.fd)
            self.fd = -1
        self.memory = {}


def start(model, device: str, cpu_mem=None, cache_experts: int | None = None):
    """An ExpertPreread of a converted model where the expert cache's size is known before the
    load plans it (module docstring); else None, as for anything unexpected."""
    if cpu_mem is not None or device not in ("cpu", "auto"):
        return None
    if not (cache_experts is None or isinstance(cache_experts, int) and cache_experts >= 1):
        return None  # the plan refuses it
    if device == "auto" and any(os.path.exists(p) for p in GPU_DRIVERS):
        return None
    if model is None or str(model) == DEFAULT_MODEL:  # the embedded model is not converted
        return None
    try:
        model_dir = resolve_model(model)
        if model_file(model_dir, PARTIAL) is not None or model_file(model_dir, MANIFEST) is None:
            return None
        return ExpertPreread(model_dir, cache_experts)
    except (MoelocalError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
