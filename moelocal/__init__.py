"""moelocal: run big Mixture-of-Experts language models on hardware that is too small for them.

import moelocal
engine = moelocal.load()                      # the embedded default model
out = engine.generate("Hello", max_new_tokens=32)
print(out.text, out.stats.decode_tokens_per_s)
"""

from .engine import Engine, Generation, load
from .errors import MoelocalError
from .generate import Stats

__all__ = ["load", "Engine", "Generation", "Stats", "MoelocalError"]
__version__ = "0.1.0"
