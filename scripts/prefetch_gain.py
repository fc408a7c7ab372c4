"""Decode speed with prefetch on against off, in alternating rounds, each run in its own process
(optionally under ../shared/tools/memcap.sh, which first evicts the model from the page cache).

    python scripts/prefetch_gain.py cache/models/mixtral-medium-int4 --cache-experts 3
    python scripts/prefetch_gain.py cache/models/mixtral-large-int4 --memcap 1536
    python scripts/prefetch_gain.py MODEL --cache-experts 3 --code /tmp/base   # also an older tree

Under --memcap, --cpu-mem is the cap less the process's own overhead (PROCESS_OVERHEAD_MIB).
Prints each round, then per code tree the medians and the on/off ratio of the medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMCAP = ROOT.parent / "shared" / "tools" / "memcap.sh"
PROCESS_OVERHEAD_MIB = 330  # Python, torch, kernels and the tokenizer: outside --cpu-mem

ONE_RUN = """
import json, sys, torch, moelocal
model, prefetch, options, n_prompt, n_gen = json.loads(sys.argv[1])
engine = moelocal.load(model, device="cpu", prefetch=prefetch, **options)
engine.stop_ids = set()
ids = torch.randint(3, engine.config.vocab_size, (n_prompt,),
                    generator=torch.Generator().manual_seed(0)).tolist()
engine.generate(ids, max_new_tokens=2)  # warm-up
out = engine.generate(ids, max_new_tokens=n_gen)
experts = out.stats.extra["experts"]
print("RESULT " + json.dumps({"tok_s": out.stats.decode_tokens_per_s,
                              "hit_rate": experts.get("hit_rate"),
                              "stall_s": experts.get("stall_s"), "kernel": engine.kernel}))
"""  # no `with`: an older tree (--code) may have no Engine.close


def one_run(args, code: Path, prefetch: bool) -> dict:
    options = {"context": args.prompt_tokens + args.gen_tokens + 8}
    if args.cache_experts:
        options["cache_experts"] = args.cache_experts
    if args.memcap:
        options["cpu_mem"] = f"{args.memcap - PROCESS_OVERHEAD_MIB}MiB"
    payload = json.dumps([args.model, prefetch, options, args.prompt_tokens, args.gen_tokens])
    cmd = [sys.executable, "-c", ONE_RUN, payload]
    if args.memcap:
        cmd = ["bash", str(MEMCAP), str(args.memcap), args.model, "--", *cmd]
    env = os.environ | {"PYTHONPATH": str(code)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"run failed ({code}, prefetch={prefetch}):\n{out.stdout}{out.stderr}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--cache-experts", type=int)
    parser.add_argument("--memcap", type=int, help="MiB, counting the page cache")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", "-p", type=int, default=32)
    parser.add_argument("--gen-tokens", "-n", type=int, default=32)
    parser.add_argument("--code", action="append", default=[], help="another source tree")
    args = parser.parse_args()
    args.model = str(Path(args.model).resolve())
    trees = [ROOT] + [Path(c).resolve() for c in args.code]
    results = {(t, p): [] for t in trees for p in (True, False)}
    for r in range(args.rounds):
        order = [(t, p) for t in trees for p in (True, False)]
        for tree, prefetch in order if r % 2 == 0 else order[::-1]:
            res = one_run(args, tree, prefetch)
            results[tree, prefetch].append(res)
            print(f"round {r}: {tree.name:>6} prefetch {'on ' if prefetch else 'off'} "
                  f"{res['tok_s']:.2f} tok/s  hit {res['hit_rate']}  stall {res['stall_s']} s",
                  flush=True)  # fmt: skip
    for tree in trees:
        on, off = (statistics.median(x["tok_s"] for x in results[tree, p]) for p in (True, False))
        print(f"{tree}: prefetch on {on:.2f} tok/s, off {off:.2f} tok/s, on/off {on / off:.3f}")


if __name__ == "__main__":
    main()
