"""Write a synthetic Mixtral-shaped checkpoint at real shapes (random weights), HF layout.

python scripts/make_checkpoint.py mixtral-medium            # -> cache/models/mixtral-medium
python scripts/make_checkpoint.py mixtral-large --out /tmp/big
"""

import argparse
import sys
import time
from pathlib import Path

from moelocal.errors import MoelocalError
from moelocal.hub import data_dir
from moelocal.synthetic import PRESETS, make_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument(
        "--out", type=Path, help="directory (default: the data dir's models/PRESET)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or data_dir() / "models" / args.preset
    start = time.perf_counter()
    try:
        make_checkpoint(out, args.preset, seed=args.seed)
    except MoelocalError as e:
        sys.exit(f"error: {e}")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
