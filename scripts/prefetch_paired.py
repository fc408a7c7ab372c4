"""Prefetch on against off in one process: two engines of the same model and slots, decoding in
alternating rounds; prints each side's median tok/s and the median of the rounds' on ÷ off (a
shared disk changes speed between rounds, so rounds are compared pairwise).

    python scripts/prefetch_paired.py MODEL --cache-experts 4 --rounds 9 -n 256

MODEL "default" is the embedded default model. scripts/prefetch_gain.py runs each side in its own
process instead (and under a memory cap).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moelocal  # noqa: E402
from moelocal.generate import Request, Stats, generate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--cache-experts", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompt-tokens", "-p", type=int, default=16)
    ap.add_argument("--gen-tokens", "-n", type=int, default=256)
    args = ap.parse_args()
    model = None if args.model == "default" else args.model
    engines = {on: moelocal.load(model, device="cpu", cache_experts=args.cache_experts,
                                 prefetch=on) for on in (True, False)}  # fmt: skip
    vocab = engines[True].config.vocab_size
    ids = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    tok_s = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            stats = Stats()
            for _ in generate(engines[on].model, [Request(ids.tolist(), args.gen_tokens)],
                              stats=[stats]):  # fmt: skip
                pass
            tok_s[on].append(stats.decode_tokens_per_s)
        print(f"round {r}: on {tok_s[True][-1]:.1f} tok/s, off {tok_s[False][-1]:.1f}", flush=True)
    paired = statistics.median(a / b for a, b in zip(tok_s[True], tok_s[False], strict=True))
    print(
        f"{args.model}, {args.cache_experts} slots: on {statistics.median(tok_s[True]):.1f} "
        f"tok/s, off {statistics.median(tok_s[False]):.1f}, on / off (paired) {paired:.3f}"
    )


if __name__ == "__main__":
    main()
