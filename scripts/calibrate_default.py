"""Fit the default model's prefetch guesses and eviction scores on its training text and ship
them with moelocal.

    python scripts/calibrate_default.py [--tokens N]

The training quotations (not the held-out ones), rendered as train_default.py trained on them,
run through the installed default model (`moelocal calibrate`'s fits, predictor.py); written to
moelocal/data/predictors/, where every load of the default model finds them. Run it again after
training the default model again (the file is named by a fingerprint of its routers).
"""

import argparse
import random
import sys
from pathlib import Path

import jinja2
from train_default import FORTUNES, documents, held_out, read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moelocal import predictor  # noqa: E402
from moelocal.calibrate import calibrate  # noqa: E402
from moelocal.engine import load  # noqa: E402
from moelocal.prefetch import TRACE_DEPTH  # noqa: E402
from moelocal.synthetic import CHAT_TEMPLATE  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=FORTUNES)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--depth", type=int, default=TRACE_DEPTH, help="fit depths 1..this")
    args = ap.parse_args()
    pairs = [p for p in read_corpus(args.corpus) if not held_out(p[1])]
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    text = "".join(documents(pairs, random.Random(0), template))
    with load(None, device="cpu", prefetch=False) as engine:
        predictors, fits, reuse_fits = calibrate(engine, text, args.tokens, args.depth)
        fp = predictor.fingerprint(engine.model)
    for f in fits:
        print(f"layer {f.source} -> {f.target}: held-out recall {f.router_recall:.3f} by the "
              f"router, {f.fitted_recall:.3f} fitted{'' if f.kept else ' (not kept)'}")  # fmt: skip
    for f in reuse_fits:
        print(f"layer {f.layer} eviction: held-out hit rate {f.lru_hit_rate:.3f} by LRU, "
              f"{f.fitted_hit_rate:.3f} fitted{'' if f.kept else ' (not kept)'}")  # fmt: skip
    path = predictor.SHIPPED / f"{fp}.safetensors"
    predictor.write(path, predictors, fp)
    print(path)


if __name__ == "__main__":
    main()
