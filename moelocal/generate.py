"""Generation as free functions in the order they run: prefill, decode_one_token, generate.

`generate` yields token ids; the engine turns them into text, stop strings and stats, so chat,
batch generation and bench all consume the same generator.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .models.common import KVCache, Transformer
from .sample import sample


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # from the first generated token to the last
    finish_reason: str = ""
    extra: dict = field(default_factory=dict)

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


def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The whole prompt (B, T) in one pass -> logits of its last position (B, V)."""
    return model(tokens, cache, last_only=True)[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per sequence (B, 1) -> next-token logits (B, V)."""
    return model(token, cache)[:, -1]


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: set[int] = frozenset(),
    stats: Stats | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens ids; an id in stop_ids is yielded, then generation ends."""
    stats = stats if stats is not None else Stats()
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.cfg.num_hidden_layers, len(prompt) + max_new_tokens)
    stats.prompt_tokens = len(prompt)
    stats.finish_reason = "length"
    if max_new_tokens <= 0:
        return
    start = time.perf_counter()
    logits = prefill(model, torch.tensor([prompt], device=device), cache)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token_id = int(token[0])
        now = time.perf_counter()
        if i == 0:
            stats.prefill_s, decode_start = now - start, now
        stats.decode_s = now - decode_start
        stats.generated_tokens += 1
        yield token_id
        if token_id in stop_ids:
            stats.finish_reason = "stop"
            return
        if i + 1 < max_new_tokens:
            logits = decode_one_token(model, token.view(1, 1), cache)
