"""moelocal: run big Mixture-of-Experts language models on hardware that is too small for them.

import moelocal
engine = moelocal.load()                      # the embedded default model
out = engine.generate("Hello", max_new_tokens=32)
print(out.text, out.stats.decode_tokens_per_s)
"""

import os

# Decode streams every active weight from memory each token; from 2 MiB pages it goes faster
# (int8 on mixtral-medium: 48 -> 53 tok/s). torch's CPU allocator gives tensors of 2 MiB and
# more transparent huge pages when this is set before its first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .errors import MoelocalError  # noqa: E402

__all__ = ["load", "Engine", "Generation", "Stats", "MoelocalError"]
# imported on first use: torch alone takes ~2 s to import, which `moelocal --help`, `list`,
# `pull` and `rm` never need
LAZY = {"load": "engine", "Engine": "engine", "Generation": "engine", "Stats": "generate"}


def __getattr__(name: str):
    """The lazy names above, and submodules (moelocal.engine) as an eager import gave them."""
    import importlib
    import importlib.util

    if name in LAZY:
        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
