"""Where decode time goes with every weight resident: the quantized matmuls alone (the floor)
against whole decode steps. Records the kernel calls of real decode steps (their weights, the
experts the router picked; a fused SwiGLU expert counts as its call), then replays just those.

    python scripts/decode_floor.py cache/models/mixtral-medium --modes int8,int4
"""

import argparse
import time

import torch

import moelocal
import moelocal.cpu_kernels
import moelocal.experts
import moelocal.quant
from moelocal.models.attention import KVCache


def per_token(fn, tokens: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of fn(), in seconds per token."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / tokens


@torch.inference_mode()
def measure(engine: moelocal.Engine, tokens: int) -> tuple[float, float]:
    """Seconds per token of whole decode steps, and of just their quantized matmuls."""
    model = engine.model
    repeats = 5
    cache = KVCache(model.cfg.num_hidden_layers, 16 + tokens * (repeats + 2))
    model(torch.arange(3, 19)[None], cache, last_only=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (tokens,), generator=gen)

    def decode():
        for t in ids.tolist():
            model(torch.tensor([[t]]), cache)

    decode()  # warm up
    step_s = per_token(decode, tokens, repeats)

    calls, matmul, swiglu = [], moelocal.quant.matmul, moelocal.cpu_kernels.swiglu

    def record(fn):
        def call(x, *args):
            calls.append((fn, x.clone(), *args))
            return fn(x, *args)

        return call

    moelocal.quant.matmul = moelocal.experts.matmul = record(matmul)
    moelocal.cpu_kernels.swiglu = record(swiglu)
    try:
        decode()
    finally:
        moelocal.quant.matmul = moelocal.experts.matmul = matmul
        moelocal.cpu_kernels.swiglu = swiglu

    def replay():
        for fn, *args in calls:
            fn(*args)

    replay()
    return step_s, per_token(replay, tokens, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--modes", default="int8,int4")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"{'mode':<6}{'decode tok/s':>14}{'matmuls-only tok/s':>20}{'outside matmuls':>17}")
    for mode in args.modes.split(","):
        engine = moelocal.load(args.model, device="cpu", quant=mode)
        step_s, floor_s = measure(engine, args.tokens)
        print(f"{mode:<6}{1 / step_s:>14.1f}{1 / floor_s:>20.1f}{1 - floor_s / step_s:>17.0%}")


if __name__ == "__main__":
    main()
