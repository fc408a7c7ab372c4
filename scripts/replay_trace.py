"""A routing trace replayed through moelocal's real expert cache, mover and I/O queue, against
experts of another model's size on this machine's disk, each layer's compute stood in for by a
sleep as long as the model it stands for computes: how real routing meets real bandwidth.

    moelocal bench -p 16 -n 256 -r 1 --trace /tmp/default.trace     # the trained default model
    python scripts/replay_trace.py /tmp/default.trace --like cache/models/mixtral-large-int4 \\
        --layer-ms 2.4 --slots 2,4,6 --prefetch off,oracle,router1,router2

The experts are written once to a scratch file (the trace's layers x experts blobs of the --like
model's int4 size, --dir) and read back with O_DIRECT as a converted model's are. Per setting:
seconds per decoded token, hit rate, expert bytes read per token, and the floor: all-resident
compute plus the bytes Belady's eviction would read at the rate measured in the same run (the
disk's, or on a GPU the source's).
`oracle` prefetches, while a layer computes, exactly the experts the next layer will need (the
bound any prefetcher is judged against); `routerD` replays the guesses the trace recorded D
layers ahead (`moelocal bench --trace` records them for every depth up to 4) through the
prefetcher's targets and the cache's switch, each guess costing --route-us, layer 0's included:
the next token's read off the head D layers before the token's end, then the embedding's
before its attention (`routerDe`: the embedding's only; `routerDx`: none of layer 0's).
"speedup" is off's time over the row's (paired by round, median), "of oracle's" the row's gain
as a share of the oracle's. A sleep frees the cores, as a GPU's compute would; on the CPU
real compute shares them with the I/O threads.
`--policy lru,learned` replays every row with each eviction policy, in the same alternating
rounds ("learned" evicts by the scores the trace recorded: the model's fitted eviction, moelocal
calibrate); speedups are then over the first policy's `off`, and "of oracle's" compares each
policy's rows with its own `off` and `oracle`.

`--device cuda` replays into GPU slots through the CUDA mover: experts copied from the host store
(page-locked RAM, `--source host`) or read from disk and copied (`--source disk`); each expert's
stand-in compute waits for its copy, as a kernel on the compute stream would.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cache_sim import POLICIES, hit_rate  # noqa: E402

from moelocal.crc import crc32  # noqa: E402
from moelocal.direct_io import ALIGN, IO_THREADS  # noqa: E402
from moelocal.expert_cache import ExpertCache  # noqa: E402
from moelocal.experts import ExpertLayout  # noqa: E402
from moelocal.io_queue import IOQueue  # noqa: E402
from moelocal.movers import CpuMover, CudaMover  # noqa: E402
from moelocal.prefetch import EMBEDDING, Prefetcher, ahead, next_token_target  # noqa: E402
from moelocal.store import DiskReader, Piece  # noqa: E402
from moelocal.trace import RoutingTrace  # noqa: E402


def layout_like(model: Path) -> ExpertLayout:
    cfg = json.loads((model / "config.json").read_text())
    intermediate = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return ExpertLayout(cfg["hidden_size"], intermediate, torch.bfloat16, "int4")


def write_experts(path: Path, layers: list[int], n_experts: int, nbytes: int) -> dict:
    """layers x experts blobs of nbytes at ALIGN strides -> their pieces (with CRC32s)."""
    stride = -(-nbytes // ALIGN) * ALIGN
    blob = torch.randint(0, 256, (stride,), dtype=torch.uint8, generator=torch.Generator())
    pieces, offset = {}, 0
    with open(path, "wb") as f:
        for layer in layers:
            for e in range(n_experts):
                blob[:8] = torch.tensor([layer, e, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
                data = blob.numpy().tobytes()
                f.write(data)
                crc = crc32(data[:nbytes])
                pieces[layer, e] = [
                    Piece("blob", path, offset, nbytes, torch.uint8, (nbytes,), crc)
                ]
                offset += stride
        f.flush()
        os.fsync(f.fileno())
    if hasattr(os, "posix_fadvise"):  # read back from the disk, not from memory
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return pieces


class SleepingComputeMover(CpuMover):
    """A sleep stands in for compute and frees the cores, as a GPU's compute would: a read's CPU
    time takes nothing from it (the prefetcher's switch reckons so)."""

    def load_seconds(self) -> tuple[float, float]:
        return super().load_seconds()[0], 0.0


def make_mover(reader: DiskReader, device: str, layers: list[int], source: str):
    if device == "cpu":
        return SleepingComputeMover(reader, IOQueue(IO_THREADS))
    host = len(reader.pieces) if source == "host" else 0
    return CudaMover(reader, IOQueue(IO_THREADS), torch.device(device), layers, host, 0)


def replay(trace, pieces, layout, slots: int, prefetch: str, policy: str, layer_ms: float,
           route_us: float, guess_rows: int | None, device: str = "cpu",
           source: str = "disk", head_us: float = 0.0) -> dict:  # fmt: skip
    """Decode the trace through a fresh cache; seconds per token and the cache's figures.
    prefetch: off, oracle, or routerD: the guesses the trace recorded D layers ahead, through
    the prefetcher's own choice of targets and the cache's switch (each costs route_us, the
    next token's route_us + head_us), with layer 0's from the head (the next token's) and from
    the embedding; routerDe: layer 0's from the embedding only; routerDx: none of layer 0's.
    guess_rows: the spare rows guesses are read into (None: as many as a plan gives them)."""
    layers = trace.header["moe_layers"]
    position = {layer: n for n, layer in enumerate(layers)}
    reader = DiskReader(pieces, layout)
    name = prefetch.removeprefix("router")
    depth = int(name.rstrip("ex")) if name != prefetch else 0
    layer_0 = "" if prefetch.endswith("x") else "e" if prefetch.endswith("e") else "he"
    layer_0 = layer_0 if depth and layers[0] == 0 else ""  # what guesses layer 0
    if guess_rows is None:  # as make_plan: top-k a layer guessed ahead
        guess_rows = trace.header["top_k"] * max(depth, prefetch == "oracle")
    mover = make_mover(reader, device, layers, source)
    cache = ExpertCache(layout, mover, layers, trace.header["experts"], slots, policy,
                        guess_rows=guess_rows)  # fmt: skip
    E = trace.header["experts"]
    # the recorded scores are handed in as the state, through an identity map
    cache.evict_by({i: (torch.eye(E), torch.zeros(E)) for i in trace.expected_by_layer()})
    targets = Prefetcher(cache, depth=depth).targets if depth else {}
    if "e" not in layer_0:
        targets.pop(EMBEDDING, None)
    if "h" not in layer_0:  # no guess of the next token's
        targets = {s: [t for t in ts if not next_token_target(s, t)] for s, ts in targets.items()}
    try:
        rate = cache.bandwidth(source)
        before = cache.stats.copy()
        steps, k = trace.steps, trace.header["top_k"]
        compute = layer_ms / 1000 / (k + 1)  # attention, then each of k experts
        start = time.perf_counter()
        for i, (layer, experts, _) in enumerate(steps):
            if layer in targets.get(EMBEDDING, ()):  # guessed before its attention
                guess_ahead(cache, layer, trace.guesses[i].get(0), route_us)
                cache.start_guesses()  # no misses of a layer's to go first
            time.sleep(compute)  # attention; then the prefetcher
            if prefetch == "oracle" and i + 1 < len(steps):
                cache.prefetch(steps[i + 1][0], steps[i + 1][1])
            for target in targets.get(layer, ()):
                # its step, in this token or (layer 0) the next
                j = i + (position[target] - position[layer]) % len(layers)
                depth_key = ahead(layer, target, layers[-1])
                ranked = trace.guesses[j].get(depth_key) if j < len(steps) else None
                cost_us = route_us + head_us * next_token_target(layer, target)
                guess_ahead(cache, target, ranked, cost_us)
            scores = trace.expected[i]
            state = torch.tensor([scores]) if scores is not None else None
            for _ in cache.experts(layer, experts, dict.fromkeys(experts, 1), state):
                if device != "cpu":  # the expert's kernels would wait for its copy
                    torch.cuda.current_stream().synchronize()
                time.sleep(compute)
        seconds = time.perf_counter() - start
        stats = cache.stats.since(before).as_dict(cache.expert_bytes)
    finally:
        cache.close()
    tokens = len(steps) / len(layers)
    return {
        "s_per_token": seconds / tokens,
        "bytes_per_s": rate,
        "hit_rate": stats["hit_rate"],
        "bytes_per_token": stats["bytes_moved"] / tokens,
        "precision": stats["prefetch_precision"],
        "recall": stats["prefetch_recall"],
        "coverage": stats["prefetch_coverage"],
        "skipped": stats["guesses_skipped"] / max(1, len(steps)),
    }


def guess_ahead(cache, target: int, ranked: list[int] | None, route_us: float):
    """Replay a recorded guess of layer target's experts (None: none was recorded), as the
    prefetcher makes it: where the layer's switch says so, at route_us."""
    if ranked is not None and cache.due(target):
        time.sleep(route_us / 1e6)
        cache.prefetch(target, ranked, route_us / 1e6)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--like", type=Path, required=True, help="the model whose expert size to use")
    ap.add_argument(
        "--layer-ms",
        type=float,
        required=True,
        help="one layer's compute when all is resident (decode ms per token / layers)",
    )
    ap.add_argument("--slots", default="2,4,6")
    ap.add_argument(
        "--prefetch",
        default="off,oracle,router1",
        help="off, oracle, routerD (the trace's guesses D layers ahead; routerDe: layer 0's "
        "from the embedding only, routerDx: none of layer 0's), comma-separated",
    )
    ap.add_argument("--route-us", type=float, default=50.0, help="what making one guess costs")
    ap.add_argument("--head-us", type=float, default=50.0,
                    help="what a guess of the next token's layer 0 costs besides: the head's "
                         "product (the default model's, on the CPU)")  # fmt: skip
    ap.add_argument("--policy", default="lru", help="lru, lfu, learned, comma-separated")
    ap.add_argument("--guess-rows", type=int, default=None,
                    help="spare rows guesses are read into, beside the slots (default: as a plan "
                         "gives them, top-k for each layer guessed ahead)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: GPU slots")
    ap.add_argument(
        "--source",
        default="disk",
        choices=["disk", "host"],
        help="where a GPU's misses come from: disk, or the host store (all in RAM)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=None, help="replay the trace's first N tokens")
    ap.add_argument("--dir", type=Path, default=None, help="where the scratch experts go")
    args = ap.parse_args()
    trace = RoutingTrace.load(args.trace)
    layers, E = trace.header["moe_layers"], trace.header["experts"]
    if args.tokens:  # shorter rounds, so that more of them fit
        trace.steps = trace.steps[: args.tokens * len(layers)]
        trace.guesses = trace.guesses[: args.tokens * len(layers)]
        trace.expected = trace.expected[: args.tokens * len(layers)]
    policies = args.policy.split(",")
    if "learned" in policies and not trace.expected_by_layer():
        sys.exit(f"{args.trace}: no eviction scores (recorded for a model with fitted ones)")
    layout = layout_like(args.like)
    by_layer = trace.by_layer()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        path = Path(scratch) / "experts.bin"
        pieces = write_experts(path, layers, E, layout.nbytes)
        size = f"{layout.nbytes / 2**20:.1f} MiB ({args.like.name}'s)"
        print(f"{trace.header.get('model')} routing, {len(trace.steps) // len(layers)} tokens, "
              f"{len(layers)} layers x {E} experts of {size}, {args.layer_ms} ms a layer, "
              f"policy {args.policy}, {args.device} slots from {args.source}")  # fmt: skip
        print("| slots | prefetch | s/token | vs floor | speedup | of oracle's | hit rate "
              "| Belady's | MiB/token | precision | recall | misses read ahead "
              "| not guessed |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for slots in [int(s) for s in args.slots.split(",")]:
            rows_of = [(pol, p) for pol in policies for p in args.prefetch.split(",")]
            runs = {name(pol, p, policies): [] for pol, p in rows_of}
            for _ in range(args.rounds):  # alternating
                for pol, p in rows_of:
                    row = replay(trace, pieces, layout, slots, p, pol, args.layer_ms,
                                 args.route_us, args.guess_rows, args.device,
                                 args.source, args.head_us)  # fmt: skip
                    runs[name(pol, p, policies)].append(row)
            belady = sum(hit_rate(t, slots, POLICIES["Belady"]) for t in by_layer.values())
            belady /= len(by_layer)
            # the floor at the source's rate over this setting's runs (it swings from run to run)
            rate = statistics.median(r["bytes_per_s"] for rows in runs.values() for r in rows)
            misses_per_token = (1 - belady) * trace.header["top_k"] * len(layers)
            floor = len(layers) * args.layer_ms / 1000 + misses_per_token * layout.nbytes / rate
            meds = {p: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                    for p, rows in runs.items()}  # fmt: skip
            # speedups paired by round (off's time over the row's in the same round), median:
            # the disk's speed swings between rounds more than prefetch changes a round
            off = runs.get(name(policies[0], "off", policies))
            speedups = {p: statistics.median(o["s_per_token"] / r["s_per_token"]
                                             for o, r in zip(off, rows, strict=True))
                        for p, rows in runs.items()} if off else {}  # fmt: skip
            for p, med in meds.items():
                # prefetch's share of the oracle's gain, both over the same policy's off
                prefix = p.rsplit("/", 1)[0] + "/" if "/" in p else ""
                speedup, own_off = speedups.get(p), speedups.get(prefix + "off")
                oracle = speedups.get(prefix + "oracle")
                gained = speedup and oracle and own_off and oracle != own_off
                of_oracle = (speedup - own_off) / (oracle - own_off) if gained else None
                print(f"| {slots} | {p} | {med['s_per_token']:.4f} | "
                      f"{med['s_per_token'] / floor:.2f}x | {cell(speedup, '{:.2f}x')} | "
                      f"{cell(of_oracle, '{:.0%}')} | {med['hit_rate']:.3f} | "
                      f"{belady:.3f} | {med['bytes_per_token'] / 2**20:.1f} | "
                      f"{med['precision']:.2f} | {med['recall']:.2f} | {med['coverage']:.2f} | "
                      f"{med['skipped']:.0%} |")  # fmt: skip


def name(policy: str, prefetch: str, policies: list[str]) -> str:
    """A row's label: its prefetch setting, after its policy where several are replayed."""
    return f"{policy}/{prefetch}" if len(policies) > 1 else prefetch


def cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
