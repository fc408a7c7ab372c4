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

from .engine import Engine, Generation, load  # noqa: E402
from .errors import MoelocalError  # noqa: E402
from .generate import Stats  # noqa: E402

__all__ = ["load", "Engine", "Generation", "Stats", "MoelocalError"]
__version__ = "0.1.0"
