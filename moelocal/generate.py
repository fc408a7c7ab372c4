"""Generation as free functions in the order they run: prefill, decode_one_token, generate.

`generate` yields token ids; the engine turns them into text, stop strings and stats, so chat,
batch generation and bench all consume the same generator.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .models.attention import KVCache
from .models.transformer import Transformer
from .sample import sample


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # from the first generated token to the last
    finish_reason: str = ""
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        """stats["decode_tokens_per_s"], stats["experts"]["hits"] (or stats["hits"]): the --json
        view, by key; expert totals are found at the top level too."""
        view = self.as_dict()
        return view[key] if key in view else self.experts[key]

    @property
    def experts(self) -> dict:
        """Expert-cache figures of this generation (see ExpertCache.stats)."""
        return self.extra.get("experts", {})

    @property
    def memory(self) -> dict:
        return self.extra.get("memory", {})

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": round(self.prefill_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "finish_reason": self.finish_reason,
            **self.extra,
        }


# Prompt tokens per forward pass (llama.cpp's batch): a long prompt's activations and attention
# mask (chunk x context) stay bounded. Each pass dequantizes the experts again for the quantized
# formats' GEMM path, which made a 4000-token prefill 22% slower in passes of 2048.
PREFILL_CHUNK = 4096


def prefill(model: Transformer, tokens: torch.Tensor, kv: KVCache) -> torch.Tensor:
    """The prompt (B, T), in passes of at most PREFILL_CHUNK tokens -> logits of its last
    position (B, V)."""
    for chunk in tokens.split(PREFILL_CHUNK, dim=1):
        logits = model(chunk, kv, last_only=True)
    return logits[:, -1]


def prefill_each(model: Transformer, requests: list, max_len: int, device):
    """Each prompt prefilled on its own, then their caches stacked into one left-padded batch
    cache -> (cache, last logits (B, V)). A row's prefill is then exactly its prefill alone
    (batched, its products would sum in orders that depend on the other prompts)."""
    caches, logits = [], []
    for r in requests:
        kv = KVCache(model.cfg.num_hidden_layers, len(r.prompt))
        logits.append(prefill(model, torch.tensor([r.prompt], device=device), kv))
        caches.append(kv)
    return KVCache.stack(caches, max_len), torch.cat(logits)


def decode_one_token(model: Transformer, token: torch.Tensor, kv: KVCache) -> torch.Tensor:
    """One new token per sequence (B, 1) -> next-token logits (B, V)."""
    return model(token, kv)[:, -1]


@dataclass
class Request:
    """One prompt to continue, with its own sampling settings."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


@torch.inference_mode()
def generate(
    model: Transformer,
    requests: list[Request],
    *,
    stop_ids: set[int] = frozenset(),
    stats: list[Stats] | None = None,
    finished: list[bool] | None = None,
    kv: KVCache | None = None,
) -> Iterator[list[int | None]]:
    """Decode the requests together; yield, each step, every row's new token (None once a row is
    done). A row ends after its max_new_tokens, after an id in stop_ids (which it yields), or
    when the consumer sets finished[row] (a stop string). `kv`, for one request, already holds
    the first kv.length tokens of its prompt: only the rest is prefilled. Each row's tokens are
    those it would get alone: prompts are prefilled one by one, and a decode step attends and
    multiplies row by row where a batch would sum in another order (DecoderLayer, project)."""
    B = len(requests)
    stats = stats if stats is not None else [Stats() for _ in requests]
    finished = finished if finished is not None else [False] * B
    device = model.model.norm.weight.device
    generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None
                  for r in requests]  # fmt: skip
    T = max(len(r.prompt) for r in requests)
    steps = max(r.max_new_tokens for r in requests)
    decode_start = [0.0] * B
    for r, s, b in zip(requests, stats, range(B), strict=True):
        s.prompt_tokens, s.finish_reason = len(r.prompt), "length"
        finished[b] = finished[b] or r.max_new_tokens <= 0
    if all(finished):
        return
    start = time.perf_counter()
    if B > 1:  # prompts prefilled one by one, then decoded together (left-padded)
        kv, logits = prefill_each(model, requests, T + steps, device)
    else:
        if kv is None:
            kv = KVCache(model.cfg.num_hidden_layers, T + steps)
        assert 0 <= kv.length < T and T + steps <= kv.max_len, (kv.length, T, steps, kv.max_len)
        logits = prefill(model, torch.tensor([requests[0].prompt[kv.length :]], device=device), kv)
    for i in range(steps):
        new: list[int | None] = [None] * B
        for b, r in enumerate(requests):
            if finished[b]:
                continue
            token = int(sample(logits[b : b + 1], r.temperature, r.top_k, r.top_p, generators[b]))
            new[b] = token
            s = stats[b]
            now = time.perf_counter()
            if s.generated_tokens == 0:
                s.prefill_s, decode_start[b] = now - start, now
            s.decode_s = now - decode_start[b]
            s.generated_tokens += 1
            if token in stop_ids:
                s.finish_reason, finished[b] = "stop", True
            elif s.generated_tokens >= r.max_new_tokens:
                finished[b] = True
        yield new
        if all(finished) or i + 1 == steps:
            break
        # finished rows keep a place in the batch; what they decode is never read
        step = torch.tensor([[t if t is not None else 0] for t in new], device=device)
        logits = decode_one_token(model, step, kv)
