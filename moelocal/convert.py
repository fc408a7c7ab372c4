"""Checkpoint -> moelocal's packed model, in the data directory.

    resident.safetensors   the weights every token needs, under their checkpoint names
    experts.bin            every routed expert as one blob in its compute layout (quantized or
                           not), each starting on a 4 KiB boundary: a miss is one direct read
    moelocal.json          the manifest: format, dtype, quant, blob size, and per expert its
                           offset and CRC32 (checked on every read)
    config.json, tokenizer files, generation config, chat template: copied

The model is written into a temporary directory marked `moelocal.partial` and renamed into place
at the end, so an interrupted convert never leaves something that later looks valid. The output
directory is replaced only when it is empty or an earlier conversion.
"""

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from .checkpoint import FORMAT, Checkpoint, file_crc32
from .crc import crc32
from .direct_io import ALIGN
from .errors import MoelocalError, reason
from .hub import check_free_space, data_dir, resolve_model
from .loader import Planned, checkpoint_quant, compute_layout, plan_model, resident_state
from .model_files import EXPERTS, MANIFEST, PARTIAL, RESIDENT, foreign_files, model_file
from .plan import OffloadOptions
from .quant import round_up
from .store import DiskReader, aligned_buffer, tensor_bytes

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "chat_template.json")  # fmt: skip


def default_out(model: str | None, model_dir: Path, quant: str) -> Path:
    """data dir/models/NAME-QUANT: a directory's name, or a hub id as owner--name."""
    local = model is None or Path(model).expanduser().exists()
    name = model_dir.name if local else str(model).replace("/", "--")
    return data_dir() / "models" / f"{name}-{quant}"


WRITTEN = {EXPERTS, RESIDENT, MANIFEST, PARTIAL, *COPIED}  # every name a conversion holds


def check_out(out: Path):
    """Refuse an output that is not ours to replace. Replaced are only an empty directory and a
    provable earlier conversion: a manifest that reads as one, and no file convert would not
    have written. Anything else may be the user's work."""
    if out.is_symlink():
        raise MoelocalError(f"--out {out} is a symbolic link: give the directory itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise MoelocalError(f"--out {out} is a file: give a directory")
    if not any(out.iterdir()):
        return
    foreign = foreign_files(out, WRITTEN)
    if foreign or not earlier_conversion(out / MANIFEST):
        what = f" ({', '.join(foreign[:3])}{', ...' * (len(foreign) > 3)})" if foreign else ""
        raise MoelocalError(f"--out {out} holds files that are not a converted model{what}: "
                            "choose a new directory")  # fmt: skip


def earlier_conversion(manifest: Path) -> bool:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("format"), int)
        and isinstance(data.get("experts"), dict)
    )


def remove_stale(out: Path):
    """Temporary directories that killed converts to `out` left behind (an interrupted one
    removes its own)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        marked = (tmp / PARTIAL).exists() or (tmp / MANIFEST).exists()  # one of ours
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and marked and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


def convert(
    model: str | None,
    quant: str | None,
    out: Path | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Path:
    """Write the packed model; returns its directory."""
    model_dir = resolve_model(model)
    ckpt = Checkpoint(model_dir)
    if ckpt.manifest is not None:
        raise MoelocalError(f"{model_dir} is already a converted model")
    # a checkpoint stored quantized keeps its format or the nearest (bitsandbytes, MXFP4, FP8)
    quant = quant or checkpoint_quant(ckpt.config, torch.device("cpu")) or "int4"
    planned = plan_model(ckpt, torch.device("cpu"), dtype, OffloadOptions(), quant)
    quant = planned.plan.quant
    out = Path(out) if out else default_out(model, model_dir, quant)
    check_out(out)
    remove_stale(out)
    stride = round_up(planned.layout.nbytes, ALIGN)
    resident = sum(ckpt.numel(key) for key in planned.resident.values())
    needed = resident * planned.dtype.itemsize + len(planned.pieces) * stride
    check_free_space(out.parent, needed, "converting")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        (tmp / PARTIAL).touch()
        write(ckpt, planned, tmp, progress)
    except BaseException as e:  # Ctrl-C included: a half-written model is only wasted disk
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a directory we may not write to
            raise MoelocalError(f"--out {out}: {reason(e)}") from None
        raise
    try:
        replace_dir(tmp, out)
    except BaseException:  # e.g. a file the user put into --out meanwhile: theirs stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_dir(new: Path, out: Path):
    """Put `new` in place of `out`; the earlier conversion there goes only once `new` is in."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        check_out(out)  # again: it may have changed while converting
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def computed_resident_state(ckpt: Checkpoint, planned: Planned) -> dict[str, torch.Tensor]:
    """The resident weights as the model computes with them (q, k, v fused, Linear layers
    quantized), by module name; a tied head is left out (it is the embeddings)."""
    model = planned.model  # on the meta device: the weights are assigned
    model.load_state_dict(resident_state(ckpt, planned, torch.device("cpu")), assign=True)
    compute_layout(model, planned.cfg, planned.plan.quant)
    state = model.state_dict()
    if planned.cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    return {name: t.contiguous() for name, t in state.items()}


def open_for_writing(path: Path) -> int:
    """experts.bin, new, written past the page cache where the file system allows (O_DIRECT: each
    blob is aligned and a whole number of blocks). Buffered, mixtral-large's 1.87 GB took 3.9 s
    of its 21 s to convert, copied into the page cache, which then held a second copy."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:  # e.g. tmpfs
            pass
    return os.open(path, flags, 0o644)


def write_all(fd: int, data: memoryview):
    while data:  # a write may take less than it is given
        data = data[os.write(fd, data) :]


def write(ckpt: Checkpoint, planned: Planned, tmp: Path, progress):
    """The packed model's files, into tmp; its partial mark goes last."""
    save_file(computed_resident_state(ckpt, planned), tmp / RESIDENT, metadata={"format": "pt"})

    layout, keys = planned.layout, sorted(planned.pieces)
    stride = round_up(layout.nbytes, ALIGN)
    # two blobs: one is written (a thread; O_DIRECT costs it no CPU) while the next is filled
    blobs = [buf[base : base + stride] for buf, base in (aligned_buffer(stride) for _ in "ab")]
    writing = [None, None]
    reader = DiskReader(planned.pieces, layout)
    entries = {}
    # two (2I, D) buffers for the experts' gate and up, reused (a fresh one's pages are faulted
    # in by the copy into it): the next expert is read into one on a thread while this one is
    # quantized from the other (the quantizing kernel lets go of the GIL)
    dtype = planned.pieces[keys[0]][0].dtype if keys else None
    wholes = [torch.zeros(2 * layout.I, layout.D, dtype=dtype) for _ in "ab"]
    fd = open_for_writing(tmp / EXPERTS)
    writer = ThreadPoolExecutor(1, thread_name_prefix="moelocal-convert-write")
    reading = ThreadPoolExecutor(1, thread_name_prefix="moelocal-convert-read")

    def read(i: int):
        return reading.submit(reader.matrices, *keys[i], wholes[i % 2]) if i < len(keys) else None

    try:
        next_mats = read(0)
        for i, (layer, e) in enumerate(keys):
            mats, next_mats = next_mats.result(), read(i + 1)
            blob = blobs[i % 2]
            if writing[i % 2] is not None:
                writing[i % 2].result()  # its previous blob is on disk
            blob.zero_()  # the padding between blobs is zeros, deterministically
            layout.fill(blob[: layout.nbytes], mats["gate_up"], mats["down"],
                        mats.get("gate_up_bias"), mats.get("down_bias"))  # fmt: skip
            crc = crc32(tensor_bytes(blob, layout.nbytes))
            entries[f"{layer}.{e}"] = {"offset": i * stride, "crc32": crc}
            writing[i % 2] = writer.submit(write_all, fd, tensor_bytes(blob, stride))
            progress(i + 1, len(keys))
        for job in writing:
            if job is not None:
                job.result()
    finally:
        reading.shutdown(wait=True, cancel_futures=True)  # nothing reads once reader is closed
        writer.shutdown(wait=True, cancel_futures=True)  # nothing writes once fd is closed
        os.close(fd)
        reader.close()
    for name in COPIED:
        if (source := model_file(ckpt.dir, name)) is not None:
            shutil.copyfile(source, tmp / name)
    manifest = {
        "format": FORMAT,
        "resident": "compute",  # stored as it computes: nothing is quantized at load
        "resident_crc32": file_crc32(tmp / RESIDENT),
        "source": str(ckpt.dir),
        "dtype": str(planned.dtype).removeprefix("torch."),
        "quant": planned.plan.quant,
        "expert_bytes": layout.nbytes,
        "stride": stride,
        "experts": entries,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (tmp / PARTIAL).unlink()
