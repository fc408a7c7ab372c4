"""Whether a batch decodes each prompt as it would alone: greedy tokens of `generate_batch`
against one prompt at a time, and the first step where each row diverges; then whether a
conversation continued over its prompt cache (chat, serve) gets a fresh prompt's tokens.

    python scripts/batch_invariance.py cache/models/mixtral-medium --quant none
    python scripts/batch_invariance.py                     # the default model

Random prompts of 5 to 40 tokens (seeded), 24 new tokens each, all rows in one batch; the
conversation: each prompt as a turn, after the previous turns and their replies.
"""

import argparse
import time

import torch

import moelocal


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--quant")
    parser.add_argument("--dtype")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    engine = moelocal.load(args.model, device="cpu", quant=args.quant, dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    vocab = min(engine.config.vocab_size, 1000)
    lengths = torch.randint(5, 41, (args.prompts,), generator=gen).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    start = time.perf_counter()
    together = engine.generate_batch(prompts, max_new_tokens=args.new_tokens)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [engine.generate(p, max_new_tokens=args.new_tokens) for p in prompts]
    alone_s = time.perf_counter() - start
    diverge = [next((i for i, (a, b) in enumerate(zip(x.token_ids, y.token_ids, strict=False))
                     if a != b), None) for x, y in zip(together, alone, strict=True)]  # fmt: skip
    n = sum(d is not None for d in diverge)
    print(
        f"{n} of {len(prompts)} rows diverge (first differing step per row: {diverge}); "
        f"batch {batch_s:.1f} s, one at a time {alone_s:.1f} s"
    )
    cache, history, differ = engine.new_prompt_cache(), [], 0
    for turn in prompts:
        history += turn
        cached = engine.generate(history, max_new_tokens=args.new_tokens, prompt_cache=cache)
        differ += (
            cached.token_ids != engine.generate(history, max_new_tokens=args.new_tokens).token_ids
        )
        history += cached.token_ids
    print(f"prompt cache: {differ} of {len(prompts)} turns differ from a fresh prompt "
          f"({len(history)} tokens in the end)")  # fmt: skip


if __name__ == "__main__":
    main()
