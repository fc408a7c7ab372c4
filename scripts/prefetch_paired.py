"""Prefetch on against off in one process: two engines of the same model and slots, decoding in
alternating rounds; prints each side's median tok/s and the median of the rounds' on ÷ off (a
shared disk changes speed between rounds, so rounds are compared pairwise). The engines swap
roles every round (the prefetcher is handed from one to the other), and each two rounds' ratios
are averaged (geometrically): two engines of the same settings can differ by themselves (where
their memory lies; prefetch off in both gave 0.95 on mixtral-large int4 without the swap).
`--control` gives neither engine the prefetcher: the spread of its result is the method's noise.
`--compare policy` pairs the learned eviction (the model's fits, moelocal calibrate) against LRU
the same way, prefetch on in both ("on" is the learned side); `--compare head` the prefetcher
with its guesses of the next token's layer 0 (read off the head) against it without them.

    python scripts/prefetch_paired.py MODEL --cache-experts 4 --rounds 10 -n 256

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
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompt-tokens", "-p", type=int, default=16)
    ap.add_argument("--gen-tokens", "-n", type=int, default=256)
    ap.add_argument("--control", action="store_true", help="neither side on (noise)")
    ap.add_argument("--compare", choices=("prefetch", "policy", "head"), default="prefetch")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU slots, host store behind)")
    args = ap.parse_args()
    model = None if args.model == "default" else args.model
    engines = [moelocal.load(model, device=args.device, cache_experts=args.cache_experts,
                             prefetch=True) for _ in range(2)]  # fmt: skip
    prefetchers = [None if args.control else engine.model.prefetcher for engine in engines]
    fits = [engine.expert_cache.reuse for engine in engines]
    if args.compare == "policy" and not fits[0]:
        sys.exit(f"{args.model}: no fitted eviction scores (moelocal calibrate)")
    vocab = engines[0].config.vocab_size
    ids = torch.randint(3, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    tok_s = {True: [], False: []}
    for r in range(args.rounds):
        with_prefetch = r % 2  # the engine whose side is on (prefetch, or learned) this round
        for i, engine in enumerate(engines):
            on = i == with_prefetch and not args.control
            if args.compare == "prefetch":
                engine.model.prefetcher = prefetchers[i] if on else None
            elif args.compare == "head":  # without the model, no guess of the next token's
                engine.model.prefetcher.model = engine.model if on else None
            else:
                engine.expert_cache.evict_by(fits[i] if on else {})
        for i in (0, 1) if r % 4 < 2 else (1, 0):
            stats = Stats()
            for _ in generate(engines[i].model, [Request(ids.tolist(), args.gen_tokens)],
                              stats=[stats]):  # fmt: skip
                pass
            tok_s[i == with_prefetch].append(stats.decode_tokens_per_s)
        print(f"round {r}: on {tok_s[True][-1]:.1f} tok/s, off {tok_s[False][-1]:.1f}", flush=True)
    ratios = [a / b for a, b in zip(tok_s[True], tok_s[False], strict=True)]
    paired = statistics.median(
        (ratios[i] * ratios[i + 1]) ** 0.5 for i in range(0, len(ratios) - 1, 2)
    ) if len(ratios) > 1 else ratios[0]  # fmt: skip
    print(
        f"{args.model}, {args.cache_experts} slots: on {statistics.median(tok_s[True]):.1f} "
        f"tok/s, off {statistics.median(tok_s[False]):.1f}, on / off (paired) {paired:.3f}"
    )


if __name__ == "__main__":
    main()
