"""The disk tier: experts read by file offset, from a checkpoint's safetensors files or from a
converted model's experts.bin.

Reads run on the I/O queue's threads (io_queue.py), with O_DIRECT where the file system allows
it, so that the page cache does not quietly hold a second copy of the model; elsewhere each read
is followed by a hint to drop its pages. A read lands in an aligned staging buffer, then is
copied into the destination blob as it is (a converted model, after its CRC32 check), or cast,
decoded (bitsandbytes, FP8, MXFP4, transposed or interleaved storage) and quantized into the
blob's layout. This module does not decide what to load; the expert cache does, and its movers
(movers.py) put the blobs where they go.
"""

import ctypes
import json
import os
import struct
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .crc import crc32
from .direct_io import ALIGN, open_uncached, read_fully
from .errors import MoelocalError
from .experts import ExpertLayout
from .io_queue import pace
from .model_files import EXPERTS, model_file
from .quant import dequantize_checkpoint, dequantize_mxfp4

LIBC = ctypes.CDLL(None) if os.name == "posix" else None  # the C library we run on
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8,
                      "F8_E4M3": torch.float8_e4m3fn}  # fmt: skip


@dataclass(frozen=True)
class Piece:
    """One matrix of one expert (or its slice of a fused tensor) in a checkpoint file."""

    # gate, up, down, gate_up, their biases (gate_up_bias, down_bias), or blob (a whole expert
    # of a converted model)
    part: str
    path: Path
    offset: int  # of its first byte in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    crc32: int | None = None  # converted models check every read
    # a weight stored quantized: its quant state (bitsandbytes, FP8 scales; Checkpoint.quant_state)
    quant_state: dict | None = field(default=None, compare=False)
    # how the checkpoint stores it, when not as an (out, in) matrix of gate rows then up rows:
    transposed: bool = False  # (in, out), for x @ W (gpt-oss)
    interleaved: bool = False  # gate and up rows alternate (gpt-oss)
    scales: "Piece | None" = None  # MXFP4: these are the blocks, and `scales` their scales

    @property
    def plain(self) -> bool:
        """Stored as the blob holds it, but perhaps for its dtype."""
        return not (self.quant_state or self.transposed or self.interleaved or self.scales)

    @property
    def decoded_shape(self) -> tuple[int, ...]:
        """Its shape as a matrix (out, in) or bias once decoded (bitsandbytes: once read)."""
        shape = self.shape
        if self.scales is not None:  # blocks (out, in / 32, 16 bytes)
            shape = (shape[0], shape[1] * 2 * shape[2])
        return shape[::-1] if self.transposed else shape


def tensor_offsets(path: Path) -> dict[str, tuple[int, int, torch.dtype, tuple]]:
    """name -> (file offset, bytes, dtype, shape). The safetensors library, which has already
    validated this file, exposes no offsets; the header is 8 bytes of length and then JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise MoelocalError(f"{path}: {name} has unsupported dtype {info['dtype']}")
        out[name] = (8 + n + start, end - start, dtype, tuple(info["shape"]))
    return out


def expert_pieces(ckpt, moe_layers, n_experts, expert_keys, fused, quant_state=None,
                  transposed: bool = False, interleaved: bool = False) -> dict:  # fmt: skip
    """(layer, expert) -> the pieces (list[Piece]) to read, from per-expert keys or fused
    (E, ...) tensors.

    fused: (layer, name) -> key, name gate_up_proj or down_proj, with a suffix _bias (its
    biases), or _blocks and _scales (MXFP4). transposed, interleaved: how the family stores its
    fused matrices (see Piece). quant_state: weight key -> quant-state keys, for experts stored
    quantized by bitsandbytes or in FP8 (their small quant-state tensors are read now, the
    packed weights by offset when needed)."""
    quant_state = quant_state or {}
    offsets, pieces = {}, {}

    def where(key):
        shard = ckpt.dir / ckpt.weight_map[key]
        if shard not in offsets:
            offsets[shard] = tensor_offsets(shard)
        return shard, offsets[shard][key]

    def piece(part, key, e=None):
        shard, (offset, nbytes, dtype, shape) = where(key)
        if key in quant_state:
            aux = ckpt.quant_state(quant_state[key])
            return Piece(part, shard, offset, nbytes, dtype, shape, quant_state=aux)
        if e is None:
            return Piece(part, shard, offset, nbytes, dtype, shape)
        if e >= shape[0]:
            raise MoelocalError(f"{shard}: {key} holds {shape[0]} experts, config.json more")
        row = nbytes // shape[0]  # expert e's slice of a fused (E, ...) tensor
        return Piece(part, shard, offset + e * row, row, dtype, shape[1:])

    def fused_parts(layer, e) -> list[Piece]:
        parts = []
        for part in ("gate_up", "down"):
            name, inter = f"{part}_proj", interleaved and part == "gate_up"
            if (layer, f"{name}_blocks") in fused:  # MXFP4 blocks are (out, in), never transposed
                scales = fused.get((layer, f"{name}_scales"))
                if scales is None:
                    raise MoelocalError(f"{ckpt.dir}: {fused[layer, f'{name}_blocks']} has no "
                                        f"{name}_scales beside it")  # fmt: skip
                blocks = piece(part, fused[layer, f"{name}_blocks"], e)
                parts.append(replace(blocks, scales=piece(part, scales, e), interleaved=inter))
            elif (layer, name) in fused:
                p = piece(part, fused[layer, name], e)
                parts.append(replace(p, transposed=transposed, interleaved=inter))
            else:
                raise MoelocalError(f"{ckpt.dir}: checkpoint lacks the {part} matrices of the "
                                    f"experts of layer {layer}")  # fmt: skip
            if (layer, f"{name}_bias") in fused:
                p = piece(f"{part}_bias", fused[layer, f"{name}_bias"], e)
                parts.append(replace(p, interleaved=inter))
        return parts

    for layer in moe_layers:
        for e in range(n_experts):
            if any(key_layer == layer for key_layer, _ in fused):
                parts = fused_parts(layer, e)
            else:
                parts = []
                for part in ("gate", "up", "down"):
                    key = expert_keys.get((layer, e, part))
                    if key is None:
                        raise MoelocalError(
                            f"{ckpt.dir}: checkpoint lacks the {part} matrix of expert {e} in "
                            f"layer {layer}"
                        )
                    parts.append(piece(part, key))
            pieces[layer, e] = parts
    return pieces


def packed_pieces(ckpt, moe_layers, n_experts) -> dict[tuple, list[Piece]]:
    """(layer, expert) -> its blob in a converted model's experts.bin."""
    entries, path = ckpt.manifest["experts"], model_file(ckpt.dir, EXPERTS)
    if path is None:
        raise MoelocalError(f"{ckpt.dir}: experts.bin is missing")
    size = ckpt.manifest["expert_bytes"]
    pieces = {}
    for layer in moe_layers:
        for e in range(n_experts):
            entry = entries.get(f"{layer}.{e}")
            if entry is None:
                raise MoelocalError(f"{ckpt.dir}: the manifest lacks expert {e} of layer {layer}")
            pieces[layer, e] = [Piece("blob", path, entry["offset"], size, torch.uint8, (size,),
                                      entry["crc32"])]  # fmt: skip
    if not path.is_file() or path.stat().st_size < max(p[0].offset + size for p in pieces.values()):
        raise MoelocalError(f"{path}: missing or truncated; run moelocal convert again")
    return pieces


def check_shapes(pieces: dict, layout: ExpertLayout):
    """Every expert's pieces have the shapes config.json implies, and biases where the family's
    experts have them, nowhere else."""
    want = layout.shapes() | {"blob": (layout.nbytes,)}
    for (layer, e), parts in pieces.items():
        biases = {p.part for p in parts if p.part.endswith("_bias")}
        if parts[0].part != "blob" and biases != ({"gate_up_bias", "down_bias"} if layout.bias
                                                  else set()):  # fmt: skip
            implied = "gate_up_bias and down_bias" if layout.bias else "none"
            raise MoelocalError(f"{parts[0].path}: expert {e} of layer {layer} has biases "
                                f"{', '.join(sorted(biases)) or 'none'}, config.json implies "
                                f"{implied}")  # fmt: skip
        for p in parts:
            shape = p.decoded_shape
            if shape != want[p.part] and p.quant_state is None:  # packed: checked once read
                raise MoelocalError(
                    f"{p.path}: expert {e} of layer {layer}: {p.part} has shape {shape}, "
                    f"config.json implies {want[p.part]}"
                )


def release_freed_memory():
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).
    An expert converted as it is read frees tens of MB of temporaries in an I/O thread, which
    glibc keeps: streaming nf4 from a checkpoint's files held 1.3 GB more than it needs."""
    trim = getattr(LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def tensor_bytes(t: torch.Tensor, nbytes: int) -> memoryview:
    """The first nbytes of a CPU tensor's memory as a buffer: read into, written out or
    checksummed in place."""
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr()))


def aligned_buffer(nbytes: int) -> tuple[torch.Tensor, int]:
    """A uint8 tensor with an ALIGN-aligned region of nbytes; returns (tensor, offset of it)."""
    buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    return buf, (-buf.data_ptr()) % ALIGN


def staged_bytes(pieces: dict, aligned_dest: bool) -> int:
    """The most bytes one read puts through an I/O thread's staging buffer (its size): a
    converted expert at an aligned offset goes straight into aligned memory (a RAM slot) but for
    its last partial block; any other piece goes through whole."""

    def staged(p: Piece) -> int:
        if aligned_dest and p.part == "blob" and p.offset % ALIGN == 0:
            return p.nbytes % ALIGN
        return p.nbytes

    return max((staged(p) for parts in pieces.values() for p in parts), default=0)


class DiskReader:
    """Reads whole experts from the checkpoint into blobs, by offset."""

    def __init__(self, pieces: dict, layout: ExpertLayout):
        self.pieces, self.layout = pieces, layout
        self.fds, self.direct = {}, {}
        for path in {p.path for parts in pieces.values() for p in parts}:
            self.fds[path], self.direct[path] = open_uncached(path)
        # one staging buffer per I/O thread, made at the size reads into aligned memory need (a
        # buffer grown piece by piece leaves glibc's heaps holding every size it outgrew)
        self.staging_bytes = staged_bytes(pieces, aligned_dest=True) + 2 * ALIGN
        self.local = threading.local()
        # converted experts whose checksum has passed: checked at their first read only (a
        # check is 1.2-1.5 ms of a core per 19 MB expert, memory-bound, 10% of its read time,
        # taken from compute on every later miss and guess)
        self.verified: set[tuple[int, int]] = set()
        self.trim = False  # release_freed_memory() after each expert converted as read

    def _staging(self, nbytes: int) -> tuple[torch.Tensor, int]:
        """This thread's staging buffer, of at least nbytes: bigger than planned only where a
        converted expert is read into unaligned memory (a CUDA mover's staging piece)."""
        buf = getattr(self.local, "buf", None)
        if buf is None or buf[0].numel() - buf[1] < nbytes:  # room past its aligned start
            self.local.buf = buf = aligned_buffer(max(nbytes, self.staging_bytes))
        return buf

    def _read_into(self, path: Path, view: memoryview, offset: int, need: int):
        """Fill view from a file offset; at least `need` of its bytes must exist."""
        if not read_fully(self.fds[path], self.direct[path], view, offset, need, pace):
            raise MoelocalError(f"{path}: file ends before offset {offset + need}")

    def _read_piece(self, p: Piece) -> torch.Tensor:
        start = p.offset - p.offset % ALIGN if self.direct[p.path] else p.offset
        length = p.offset + p.nbytes - start
        if self.direct[p.path]:
            length += (-length) % ALIGN
        buf, base = self._staging(length)
        self._read_into(
            p.path, tensor_bytes(buf[base:], length), start, p.offset + p.nbytes - start
        )
        lo = base + p.offset - start
        raw = buf[lo : lo + p.nbytes]
        if (raw.data_ptr() % p.dtype.itemsize) != 0:
            raw = raw.clone()
        return raw.view(p.dtype).view(p.shape)

    def _float_matrix(self, p: Piece, layer: int, e: int, out=None) -> torch.Tensor:
        """The piece as a float (out, in) matrix or bias of its own (the staging buffer is reused
        by the next piece): copied into `out` when given (gate and up into their halves of one
        matrix). Decoded as the checkpoint stores it: dequantized, transposed, de-interleaved."""
        raw = self._read_piece(p)
        if p.plain:
            if out is None or out.dtype != raw.dtype or out.shape != raw.shape:
                return raw.clone()
            ctypes.memmove(out.data_ptr(), raw.data_ptr(), p.nbytes)  # no OpenMP team here
            return out
        w = raw.clone()
        if p.quant_state is not None:
            w = dequantize_checkpoint(w, p.quant_state)
            want = self.layout.shapes()[p.part]
            if tuple(w.shape) != want:
                raise MoelocalError(f"{p.path}: expert {e} of layer {layer}: {p.part} has shape "
                                    f"{tuple(w.shape)}, config.json implies {want}")  # fmt: skip
        if p.scales is not None:
            w = dequantize_mxfp4(w, self._read_piece(p.scales))
        if p.transposed:
            w = w.t()
        if p.interleaved:  # gate rows first, then up rows, as the blob holds them
            w = torch.cat((w[0::2], w[1::2]))
        return w

    def _read_blob(self, p: Piece, dest: torch.Tensor):
        """A converted expert straight into dest where the bytes allow (O_DIRECT wants the
        file offset and the memory block-aligned: the whole blocks go there, the last partial
        one through the staging buffer), else through the staging buffer. A staging copy into
        a fresh slot faults its pages in from user space: 4 threads spent 7.8 s in it for
        mixtral-large's 1.87 GB, the reads themselves 1.4 s."""
        if self.direct[p.path] and (p.offset % ALIGN or dest.data_ptr() % ALIGN):
            ctypes.memmove(dest.data_ptr(), self._read_piece(p).data_ptr(), p.nbytes)
            return
        whole = p.nbytes - p.nbytes % ALIGN if self.direct[p.path] else p.nbytes
        self._read_into(p.path, tensor_bytes(dest, whole), p.offset, whole)
        if whole < p.nbytes:
            tail = replace(p, offset=p.offset + whole, nbytes=p.nbytes - whole,
                           shape=(p.nbytes - whole,))  # fmt: skip
            ctypes.memmove(dest.data_ptr() + whole, self._read_piece(tail).data_ptr(), tail.nbytes)

    def matrices(self, layer: int, e: int, whole=None) -> dict[str, torch.Tensor]:
        """Expert e of layer as float matrices of its own, as the checkpoint stores it decoded:
        gate_up (2I, D), down (D, I) and the biases it has. Gate and up are read straight
        into the halves of one matrix (no concatenating copy): `whole`, when given, a (2I, D)
        buffer to reuse (a fresh one's pages are faulted in by the copy, 0.8 s of converting
        mixtral-medium)."""
        parts, layout = self.pieces[layer, e], self.layout
        halves = {}
        if {p.part for p in parts} >= {"gate", "up"}:
            if whole is None or whole.dtype != parts[0].dtype:
                whole = torch.empty(2 * layout.I, layout.D, dtype=parts[0].dtype)
            halves = {"gate": whole[: layout.I], "up": whole[layout.I :]}
        mats = {p.part: self._float_matrix(p, layer, e, halves.get(p.part)) for p in parts}
        if "gate_up" not in mats:
            read_in_place = all(mats[h] is halves[h] for h in ("gate", "up"))
            mats["gate_up"] = whole if read_in_place else torch.cat([mats["gate"], mats["up"]])
        return mats

    def read(self, layer: int, e: int, dest: torch.Tensor) -> torch.Tensor:
        """Fill dest (one expert blob on the CPU) with expert e of layer, in dest's layout."""
        layout = self.layout
        parts = self.pieces[layer, e]
        first = parts[0]
        if first.part == "blob":  # a converted model: the blob is stored as it is computed with
            self._read_blob(first, dest)
            if (layer, e) not in self.verified:
                if crc32(tensor_bytes(dest, first.nbytes)) != first.crc32:
                    raise MoelocalError(
                        f"{first.path}: expert {e} of layer {layer} fails its checksum (corrupt "
                        "file); run moelocal convert again"
                    )
                self.verified.add((layer, e))
            return dest
        if layout.mode != "none" or not all(p.plain for p in parts):
            # converted as read: the float matrices, then the layout's segments
            mats = self.matrices(layer, e)
            layout.fill(dest, mats["gate_up"], mats["down"], mats.get("gate_up_bias"),
                        mats.get("down_bias"))  # fmt: skip
            if self.trim:
                del mats
                release_freed_memory()
            return dest
        views = layout.views(dest)
        gate_up, down = views["gate_up"]["w"], views["down"]["w"]
        I = layout.I
        targets = {"gate": gate_up[:I], "up": gate_up[I:], "gate_up": gate_up, "down": down}
        if layout.bias:
            targets |= {"gate_up_bias": views["gate_up_bias"]["b"],
                        "down_bias": views["down_bias"]["b"]}  # fmt: skip
        for p in parts:
            src, dst = self._read_piece(p), targets[p.part]
            if src.dtype == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
                # a plain memcpy: a torch copy from an I/O thread starts an OpenMP team of its
                # own, and the idle teams of these threads slow the compute threads down
                ctypes.memmove(dst.data_ptr(), src.data_ptr(), p.nbytes)
            else:
                dst.copy_(src)
        return dest

    def close(self):
        """Close the files (no read may be running: the I/O queue is closed first)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
