"""Range checks of values a user gives (options, batch lines, API arguments): each failure is one
MoelocalError naming the setting and the value, raised before any work starts."""

import math

from .errors import MoelocalError

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def whole(name: str, value, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise MoelocalError(f"{name} must be a whole number >= {low}, got {value!r}")
    return value


def sampling(temperature, top_k=None, top_p=None, seed=None):
    """temperature: a finite number >= 0 (0 is greedy); top_k: None or >= 0 (0 is off); top_p:
    None or in (0, 1]; seed: None or a whole number torch can seed with."""
    if (not isinstance(temperature, int | float) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):  # fmt: skip
        raise MoelocalError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        whole("top_k", top_k)
    if top_p is not None and (
        not isinstance(top_p, int | float) or isinstance(top_p, bool) or not 0 < top_p <= 1
    ):
        raise MoelocalError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool)
        or not SEED_RANGE[0] <= seed < SEED_RANGE[1]
    ):  # fmt: skip
        raise MoelocalError(f"seed must be a whole number in [-2**63, 2**64), got {seed!r}")
