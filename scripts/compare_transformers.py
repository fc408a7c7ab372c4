"""Decode speed of moelocal and of transformers on one checkpoint, dtype and device, in one run.

    python scripts/compare_transformers.py                       # cache/models/mixtral-medium
    python scripts/compare_transformers.py MODEL_DIR --gen-tokens 64 --dtype float32

Both engines decode the same random prompt greedily, with every weight resident. Decode speed is
(n - 1) / (time for n tokens - time for 1 token), so prefill and start-up cancel out. Needs
transformers (a test dependency).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import moelocal
from moelocal.hub import data_dir
from moelocal.synthetic import make_checkpoint


def timed(fn, repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(generate, n: int, repetitions: int) -> float:
    generate(2)  # warm-up
    return (n - 1) / (
        timed(lambda: generate(n), repetitions) - timed(lambda: generate(1), repetitions)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: the checkpoint's")
    args = parser.parse_args()
    model_dir = args.model or data_dir() / "models" / "mixtral-medium"
    if not model_dir.exists():
        make_checkpoint(model_dir, "mixtral-medium")

    engine = moelocal.load(model_dir, device="cpu", dtype=args.dtype)
    engine.stop_ids = set()  # always decode the full count
    dtype = engine.plan.dtype
    vocab = engine.config.vocab_size
    prompt = torch.randint(
        3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)
    )
    ids = prompt.tolist()

    ours = decode_rate(lambda n: engine.generate(ids, max_new_tokens=n), args.gen_tokens,
                       args.repetitions)  # fmt: skip

    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def hf_generate(n):
        with torch.inference_mode():
            ref.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False)

    theirs = decode_rate(hf_generate, args.gen_tokens, args.repetitions)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"model {model_dir} dtype {dtype_name} threads {torch.get_num_threads()}")
    print(f"{'engine':<14}{'decode tok/s':>14}")
    print(f"{'moelocal':<14}{ours:>14.2f}")
    print(f"{'transformers':<14}{theirs:>14.2f}")
    print(f"ratio moelocal / transformers: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
