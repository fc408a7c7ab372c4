"""Learned guesses of routing: a later layer's, for the prefetcher, and a layer's next steps',
for the expert cache's eviction.

Layer T's own router applied to the hidden state after layer L's attention guesses T's experts
well where the residual stream changes little between them, and badly where it does not: on the
default model layer 0's MoE moves it so far that layer 1's router named 49% of layer 1's experts
from it (k+1 guesses), against 82-95% for the later layers. A linear map from that hidden state
(normed as T's router sees it) to T's router logits, fitted on text the model has run
(`moelocal calibrate`), names 86%; over all layers 0.91 against 0.81.

A fit is pulled towards T's own router (ridge regression towards it), so that little text gives
the router back, and is kept only where it guesses better than the router on held-out tokens.
A layer's next steps are guessed from the hidden state its experts see now: a linear map to each
expert's discounted count of uses in the steps to come (REUSE_DECAY per step), fitted on the same
text and kept only where a cache evicting the lowest count (slot_map.Learned) hits more often
than LRU on held-out tokens. On the default model it closes a third of LRU's distance to Belady's
optimum (held-out quotations, 2 / 4 / 6 slots of 8: LRU 0.365 / 0.607 / 0.817, fitted 0.402 /
0.661 / 0.850, Belady 0.483 / 0.764 / 0.914); knowing the next token's experts exactly and LRU
after that would make 0.462 / 0.679 / 0.850, so the rest is in tokens further ahead.

Fits are stored per model under a fingerprint of its routers, in moelocal's data directory
(or shipped with moelocal for the default model): never in the model's own directory.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import MoelocalError
from .hub import data_dir
from .models.moe import route

FORMAT = "moelocal-route-predictors"
VERSION = "1"
SHIPPED = Path(__file__).resolve().parent / "data" / "predictors"
HELD_OUT = 0.2  # the share of the calibration tokens (the last ones) a fit is judged on
# ridge strengths tried, per token-sample: larger pulls harder towards the router
STRENGTHS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
MIN_GAIN = 0.005  # recall (or hit rate) a fit must add on held-out tokens to be kept
REUSE_DECAY = 0.5  # a use j steps ahead counts REUSE_DECAY^(j-1) (0.5-0.8 did alike; 0.01 less)
REUSE_HORIZON = 8  # steps ahead counted (0.5^8: nothing further weighs)


Map = tuple[torch.Tensor, torch.Tensor]  # weight (E, D), bias (E)


class RoutePredictors:
    """maps: (source layer, target layer) -> a linear map from the hidden state after the
    source's attention, normed by the target's post-attention norm, to the target's router
    logits. reuse: MoE layer -> a linear map from the hidden state its experts see (one token's)
    to each expert's expected uses in the steps to come."""

    def __init__(self, maps: dict[tuple[int, int], Map], reuse: dict[int, Map] | None = None):
        self.maps, self.reuse = maps, reuse or {}

    def gate(self, source: int, target: int):
        """The fitted map as a router would be called (x (N, D) -> logits (N, E)), or None."""
        fitted = self.maps.get((source, target))
        if fitted is None:
            return None
        weight, bias = fitted
        return lambda x: torch.addmm(bias, x.to(weight.dtype), weight.t())

    def to(self, device: torch.device) -> "RoutePredictors":
        def move(maps):
            return {k: (w.to(device), b.to(device)) for k, (w, b) in maps.items()}

        return RoutePredictors(move(self.maps), move(self.reuse))


def fingerprint(model) -> str:
    """Names a model's routing: its MoE layers' router shapes and a few rows of each, in float32
    (the same for a checkpoint and its conversion, on any device; a few rows, because a
    DeepSeek-V3 has 400 MB of routers to hash at every start)."""
    digest = hashlib.sha256()
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(layer.mlp, "experts"):
            continue
        w = gate.weight.detach()
        rows = sorted({0, w.shape[0] // 2, w.shape[0] - 1})
        digest.update(f"{i}:{tuple(w.shape)}".encode())
        digest.update(w[rows].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def stored_path(fp: str) -> Path:
    """Where `moelocal calibrate` keeps a model's fits."""
    return data_dir() / "predictors" / f"{fp}.safetensors"


def find(model) -> tuple[RoutePredictors | None, str | None]:
    """The fits stored for this model, if any, and a note for a stored file that cannot be used
    (the prefetcher then guesses with the routers alone)."""
    fp = fingerprint(model)
    for path in (SHIPPED / f"{fp}.safetensors", stored_path(fp)):
        if path.is_file():
            try:
                return read(path, fp), None
            except (OSError, ValueError, SafetensorError) as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                return None, f"ignoring {path} ({why}); run moelocal calibrate again"
    return None, None


def read(path: Path, fp: str) -> RoutePredictors:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} {FORMAT} file")
    if meta.get("fingerprint") != fp:
        raise ValueError("fitted for another model")
    tensors = load_file(str(path))

    def linear(name: str, what: str) -> Map:
        weight, bias = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"{what}: shapes {weight.shape}, {bias.shape}")
        return weight.float(), bias.float()

    try:
        maps = {(s, t): linear(f"{s}.{t}", f"layer {s} -> {t}")
                for s, t in json.loads(meta["pairs"])}  # fmt: skip
        # files written before reuse fits have none (they are still read)
        reuse = {int(i): linear(f"reuse.{i}", f"layer {i}'s reuse")
                 for i in json.loads(meta.get("reuse", "[]"))}  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ValueError(f"incomplete ({e})") from None
    return RoutePredictors(maps, reuse)


def check_replaceable(path: Path):
    """A file at `path` is replaced only if it holds fits (a user's other file never is)."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise ValueError
    except (OSError, ValueError, SafetensorError):
        raise MoelocalError(f"{path} exists and is not a file of fitted guesses; "
                            "choose another --out") from None  # fmt: skip


def write(path: Path, predictors: RoutePredictors, fp: str):
    """Written beside `path` and renamed into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    named = {f"{s}.{t}": m for (s, t), m in predictors.maps.items()}
    named |= {f"reuse.{i}": m for i, m in predictors.reuse.items()}
    tensors = {}
    for name, (weight, bias) in named.items():
        tensors[f"{name}.weight"] = weight.float().contiguous()
        tensors[f"{name}.bias"] = bias.float().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": fp,
            "pairs": json.dumps(sorted(predictors.maps)),
            "reuse": json.dumps(sorted(predictors.reuse))}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def recall(logits: torch.Tensor, real: torch.Tensor, guess_cfg, cfg, bias) -> float:
    """The share of the experts routed from `real` (router logits) that the k+1 guesses routed
    from `logits` name, over all tokens."""
    guessed, needed = route(logits, guess_cfg, bias)[0], route(real, cfg, bias)[0]
    hits = (guessed[:, :, None] == needed[:, None, :]).any(-1).sum()
    return float(hits) / needed.numel()


def fit(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        judge) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float, float]:  # fmt: skip
    """A map from x (N, D), normed source hidden states, to y (N, E), the target router's logits
    on the same tokens, by ridge regression towards the router (weight (E, D), bias). Its
    strength is the one whose fit, made on the first tokens, guesses the held-out last ones best
    (judge(logits, real) -> recall); refitted on all tokens. Returns the map (None where the
    router guesses as well), the router's held-out recall and the map's."""
    n, d = x.shape
    a = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    b0 = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    prior = torch.cat([weight.t().double(), b0[None]])
    y = y.double()
    split = n - max(1, int(n * HELD_OUT))
    scale = float((a[:split] ** 2).sum()) / (d + 1) / split  # a feature's mean square, per token

    def solve(rows: slice, strength: float):
        gram, eye = a[rows].t() @ a[rows], torch.eye(d + 1, dtype=torch.float64)
        lam = strength * scale
        return torch.linalg.solve(gram + lam * eye, a[rows].t() @ y[rows] + lam * prior)

    held = slice(split, None)
    router = judge((a[held] @ prior).float(), y[held].float())
    scores = {s: judge((a[held] @ solve(slice(0, split), s)).float(), y[held].float())
              for s in STRENGTHS}  # fmt: skip
    best = max(scores, key=scores.__getitem__)
    if scores[best] < router + MIN_GAIN:
        return None, router, scores[best]
    theta = solve(slice(None), best).float()
    return (theta[:d].t().contiguous(), theta[d].contiguous()), router, scores[best]


def coming_uses(ids: torch.Tensor, n_experts: int,
                ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ids (N, K): each token's experts, tokens in order; ends (N,): the index one past the end
    of each token's passage. -> each token's discounted count of every expert's uses in the next
    REUSE_HORIZON tokens of its passage (N, E), and which tokens have that many after them."""
    n, t = len(ids), torch.arange(len(ids))
    used = torch.zeros(n, n_experts).scatter_(1, ids.long(), 1.0)
    coming = torch.zeros(n, n_experts)
    for j in range(1, min(REUSE_HORIZON, n - 1) + 1):
        inside = (t[:-j] + j < ends[:-j]).float()[:, None]
        coming[:-j] += REUSE_DECAY ** (j - 1) * used[j:] * inside
    return coming, t + REUSE_HORIZON < ends


def fit_reuse(x: torch.Tensor, ids: torch.Tensor, ends: torch.Tensor, n_experts: int,
              judge) -> tuple[Map | None, float, float]:  # fmt: skip
    """A map from x (N, D), the hidden states one MoE layer's experts saw, to each expert's
    coming uses (coming_uses), by ridge regression; its strength the one whose fit, made on the
    first tokens, hits best (judge(scores of the held-out last ones, or None for LRU) -> hit
    rate); refitted on all. Returns the map (None where it hits no more than LRU), LRU's
    held-out hit rate and the map's."""
    n, d = x.shape
    y, full = coming_uses(ids, n_experts, ends)
    a = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    split = n - max(1, int(n * HELD_OUT))
    scale = float((a[:split] ** 2).sum()) / (d + 1) / split

    def solve(rows: torch.Tensor, strength: float) -> torch.Tensor:
        gram = a[rows].t() @ a[rows] + strength * scale * torch.eye(d + 1, dtype=torch.float64)
        return torch.linalg.solve(gram, a[rows].t() @ y[rows].double())

    head = full.clone()
    head[split:] = False  # fitted on the first tokens only, to be judged on the others
    lru = judge(None)
    scores = {s: judge((a[split:] @ solve(head, s)).float()) for s in STRENGTHS[:3]}
    best = max(scores, key=scores.__getitem__)
    if scores[best] < lru + MIN_GAIN:
        return None, lru, scores[best]
    theta = solve(full, best).float()
    return (theta[:d].t().contiguous(), theta[d].contiguous()), lru, scores[best]
