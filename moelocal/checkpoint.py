"""A Hugging Face checkpoint directory read lazily: config.json and safetensors (one or more files).

Only safetensors are ever opened: pickle weights (*.bin, *.pt) are refused with a clear message.
Every shard's header is checked when the checkpoint is opened, so a missing, truncated or corrupt
file fails at load time with its name, not halfway through a generation. This module knows
nothing about model families; the key tables live in models/.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import DTYPE_NAMES, read_config_json
from .crc import crc32
from .errors import MoelocalError
from .model_files import MANIFEST, PARTIAL, RESIDENT, model_file

INDEX_NAME = "model.safetensors.index.json"
# the converted format: 3 stores the resident weights as they compute (q, k, v fused, Linear
# layers quantized: "resident": "compute" in the manifest); 2 stored the checkpoint's, quantized
# at every load, and still loads that way; 2 and 3 store int8/int4 experts in quant.py's layout;
# 1 stored them in torch's packed layouts, which moelocal no longer reads (none, nf4, fp4 blobs
# are the same in all)
FORMAT = 3
OWN_LAYOUT_QUANTS = ("int8", "int4")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def file_crc32(path) -> int:
    """CRC32 of a whole file, read in 4 MiB pieces into one buffer (a fresh bytes object per
    piece, its pages faulted in each time, held the check to 63% of the page cache's rate)."""
    crc, buf = 0, bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = crc32(view[:n], crc)
    return crc


def check_manifest(m: dict):
    """The fields moelocal reads from a manifest, of the types it reads them as (a TypeError or
    ValueError naming the field otherwise)."""

    def whole(value, name, low=0):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")

    if not isinstance(m, dict):
        raise TypeError("not a JSON object")
    if m["dtype"] not in DTYPE_NAMES or not isinstance(m["quant"], str):
        raise ValueError(f"dtype {m['dtype']!r} or quant {m['quant']!r}")
    if not isinstance(m["experts"], dict):
        raise TypeError("experts must map 'layer.expert' to {offset, crc32}")
    for key, entry in m["experts"].items():
        if not isinstance(entry, dict):
            raise TypeError(f"experts[{key!r}] must be {{offset, crc32}}")
        whole(entry["offset"], f"experts[{key!r}].offset")
        whole(entry["crc32"], f"experts[{key!r}].crc32")
    for name in ("expert_bytes", "stride", "resident_crc32"):
        if name in m:
            whole(m[name], name)


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise MoelocalError(f"model directory not found: {self.dir}")
        if (self.dir / PARTIAL).exists():
            raise MoelocalError(f"{self.dir}: an interrupted `moelocal convert`; run it again")
        self.manifest = self._manifest()  # None for a Hugging Face checkpoint
        self.config = read_config_json(self.dir)
        self.weight_map = self._weight_map()  # tensor name -> shard file name
        self._shards = {name: self._open(name) for name in sorted(set(self.weight_map.values()))}

    def _manifest(self) -> dict | None:
        path = model_file(self.dir, MANIFEST)
        if path is None:
            return None
        try:
            manifest = json.loads(path.read_text())
            check_manifest(manifest)
            version = manifest.get("format", 1)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise MoelocalError(
                f"{path}: invalid manifest ({e}); run moelocal convert again"
            ) from None
        old = version == 1 and manifest["quant"] in OWN_LAYOUT_QUANTS
        if old or not isinstance(version, int) or version not in (1, 2, FORMAT):
            raise MoelocalError(
                f"{self.dir}: converted by another moelocal version (format {version!r}, --quant "
                f"{manifest['quant']}; this one reads format {FORMAT}): run moelocal convert again"
            )
        expected = manifest.get("resident_crc32")  # absent in conversions made before it
        if expected is not None:
            path = model_file(self.dir, RESIDENT)
            if path is None or file_crc32(path) != expected:
                raise MoelocalError(f"{self.dir / RESIDENT} is missing or fails its checksum: "
                                    "run moelocal convert again")  # fmt: skip
        return manifest

    def _weight_map(self) -> dict[str, str]:
        if self.manifest is not None:
            return {key: RESIDENT for key in self._open(RESIDENT).keys()}
        index = model_file(self.dir, INDEX_NAME)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise MoelocalError(f"{index}: invalid index ({e})") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise MoelocalError(f"{index}: weight_map must map tensor names to file names")
            for shard in sorted(set(weight_map.values())):
                if model_file(self.dir, shard) is None:
                    raise MoelocalError(
                        f"{self.dir}: shard {shard} named in {INDEX_NAME} is missing"
                    )
            return weight_map
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if "model.safetensors" in files:
            files = ["model.safetensors"]
        if not files:
            pickles = [p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise MoelocalError(
                    f"{self.dir}: weights only in pickle files ({', '.join(sorted(pickles)[:3])}); "
                    "moelocal loads safetensors only (re-save with transformers' save_pretrained)"
                )
            raise MoelocalError(f"{self.dir}: no *.safetensors weights")
        return {key: name for name in files for key in self._open(name).keys()}

    def _open(self, name: str):
        path = model_file(self.dir, name)
        if path is None:
            raise MoelocalError(f"{self.dir}: {name} is missing")
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise MoelocalError(
                f"{self.dir / name}: truncated or corrupt safetensors file ({e})"
            ) from None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None or shard not in self._shards:
            raise MoelocalError(f"{self.dir}: checkpoint lacks tensor {name}")
        try:
            return self._shards[shard].get_tensor(name)
        except SafetensorError as e:
            raise MoelocalError(f"{self.dir / shard}: cannot read {name} ({e})") from None

    def quant_state(self, keys: dict[str, str]) -> dict:
        """The quant state of a weight stored quantized, {suffix: tensor} from its keys {suffix:
        key} (quant.dequantize_checkpoint reads it); FP8 scales come with their block shape."""
        state = {suffix: self.get(key) for suffix, key in keys.items()}
        if "weight_scale_inv" in state:
            q = self.config.get("quantization_config") or {}
            block = q.get("weight_block_size") or [128, 128]
            if not (isinstance(block, list) and len(block) == 2
                    and all(isinstance(b, int) and b > 0 for b in block)):  # fmt: skip
                raise MoelocalError(f"config.json: weight_block_size must be two whole numbers, "
                                    f"got {block!r}")  # fmt: skip
            state["block"] = tuple(block)
        return state

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its header (nothing read)."""
        return tuple(self._shards[self.weight_map[name]].get_slice(name).get_shape())

    def numel(self, name: str) -> int:
        """Elements of a tensor, from its header (nothing read)."""
        return math.prod(self.shape(name))

    def close(self):
        """Drop the memory maps: what is still needed is read by offset (store.py)."""
        self._shards = {}
