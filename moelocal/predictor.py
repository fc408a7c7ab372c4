"""Learned guesses of a later layer's routing, for the prefetcher.

Layer T's own router applied to the hidden state after layer L's attention guesses T's experts
well where the residual stream changes little between them, and badly where it does not: on the
default model layer 0's MoE moves it so far that layer 1's router named 49% of layer 1's experts
from it (k+1 guesses), against 82-95% for the later layers. A linear map from that hidden state
(normed as T's router sees it) to T's router logits, fitted on text the model has run
(`moelocal calibrate`), names 86%; over all layers 0.91 against 0.81.

A fit is pulled towards T's own router (ridge regression towards it), so that little text gives
the router back, and is kept only where it guesses better than the router on held-out tokens.
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
MIN_GAIN = 0.005  # recall a fit must add to the router's on held-out tokens to be kept


class RoutePredictors:
    """(source layer, target layer) -> a linear map (weight (E, D), bias (E)) from the hidden
    state after the source's attention, normed by the target's post-attention norm, to the
    target's router logits."""

    def __init__(self, maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]):
        self.maps = maps

    def gate(self, source: int, target: int):
        """The fitted map as a router would be called (x (N, D) -> logits (N, E)), or None."""
        fitted = self.maps.get((source, target))
        if fitted is None:
            return None
        weight, bias = fitted
        return lambda x: torch.addmm(bias, x.to(weight.dtype), weight.t())

    def to(self, device: torch.device) -> "RoutePredictors":
        return RoutePredictors({k: (w.to(device), b.to(device)) for k, (w, b) in self.maps.items()})


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
    maps = {}
    for source, target in json.loads(meta["pairs"]):
        weight, bias = tensors[f"{source}.{target}.weight"], tensors[f"{source}.{target}.bias"]
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"layer {source} -> {target}: shapes {weight.shape}, {bias.shape}")
        maps[(source, target)] = (weight.float(), bias.float())
    return RoutePredictors(maps)


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
    tensors = {}
    for (source, target), (weight, bias) in predictors.maps.items():
        tensors[f"{source}.{target}.weight"] = weight.float().contiguous()
        tensors[f"{source}.{target}.bias"] = bias.float().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": fp,
            "pairs": json.dumps(sorted(predictors.maps))}  # fmt: skip
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
