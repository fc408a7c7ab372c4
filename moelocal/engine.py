"""The public API: load() a model into an Engine; Engine.generate() and Engine.logits().

The engine turns the token generator (generate.py) into text: tokenization, streaming,
stop strings, end-of-sequence ids and stats. Every command of the CLI goes through it.
"""

import gc
import json
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from . import cpu_kernels, reasoning, validate
from .checkpoint import Checkpoint
from .config import DTYPES, ModelConfig
from .disk_embedding import DiskEmbedding
from .errors import MoelocalError
from .generate import PREFILL_CHUNK, Request, Stats, generate
from .hub import resolve_model
from .loader import load_model, plan_model
from .model_files import model_file
from .models.attention import KVCache
from .plan import OffloadOptions
from .preread import ExpertPreread
from .preread import start as start_preread
from .tokenizer import Tokenizer


@dataclass
class Generation:
    text: str  # the answer (a reasoning model's reasoning is apart, below)
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated ids only, the end-of-sequence id included when it came
    stats: Stats = field(default_factory=Stats)
    reasoning: str = ""  # what a reasoning model thought before its answer (reasoning.py)

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason

    @property
    def timings(self) -> dict:
        return self.stats.as_dict()

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            **({"reasoning": self.reasoning} if self.reasoning else {}),
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.timings,
        }


def pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        supported = "auto, cpu, cuda, cuda:N"
        raise MoelocalError(f"unsupported device '{device}' (supported: {supported})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoelocalError("--device cuda: no CUDA GPU is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise MoelocalError(f"unsupported device '{device}' (supported: auto, cpu, cuda)")
    return device


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoelocalError(f"unsupported dtype '{dtype}' (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load(
    model: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    quant: str | None = None,
    threads: int | None = None,
    preread: "ExpertPreread | None" = None,
    **offload_options,
) -> "Engine":
    """Load a model: a local Hugging Face directory, a hub id in the local cache, or None for the
    embedded default model. dtype None keeps the checkpoint's dtype; quant "int8" or "int4"
    quantizes on load the experts and the Linear layers (not routers, norms, embeddings).

    threads: CPU threads for torch and the kernels (default: the physical cores).
    Offload options: gpu_mem, cpu_mem (bytes or sizes like "6GiB"), cache_experts (slots per
    layer), cache_policy ("learned", "lru" or "lfu"), prefetch (bool), prefetch_margin,
    prefetch_depth (layers ahead), miss_policy ("auto", "load" or "cpu"; CUDA), context (tokens
    of KV cache to plan for).
    preread: a converted model's experts already being read (preread.start, as the CLI does
    before importing torch); by default they start here, where they can.
    Close the engine (or use it in a `with` block) to release its I/O threads and files.
    """
    try:
        options = OffloadOptions(**offload_options)
        cpu_kernels.set_threads(threads)
        model_dir = resolve_model(model)
        device = pick_device(device)
        if preread is None:
            preread = start_preread(model_dir, device.type, options.cpu_mem, options.cache_experts)
        # the process before any weight (experts a preread already holds not counted)
        baseline_rss = psutil.Process().memory_info().rss - (preread.bytes_read if preread else 0)
        ckpt = Checkpoint(model_dir)
        loaded = load_model(ckpt, device, pick_dtype(dtype), options, quant, preread)
    finally:
        if preread is not None:
            preread.close()
    try:
        has_tokenizer = model_file(model_dir, "tokenizer.json") is not None
        tokenizer = Tokenizer(model_dir) if has_tokenizer else None
        return Engine(model_dir, loaded, tokenizer, device, baseline_rss)
    except BaseException:  # e.g. a damaged tokenizer.json: no I/O threads left behind
        if loaded.expert_cache is not None:
            loaded.expert_cache.close()
        raise


def stop_token_ids(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> set[int]:
    """generation_config.json's eos ids (what transformers' generate stops on), else config.json's,
    else the tokenizer's eos token."""
    path = model_file(model_dir, "generation_config.json")
    if path is not None:
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (ValueError, RecursionError, AttributeError) as e:
            raise MoelocalError(f"{path}: invalid JSON object ({e})") from None
        ids = [eos] if isinstance(eos, int) else eos
        if eos is not None:
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise MoelocalError(f"{path}: eos_token_id must be a token id or a list of them")
            return set(ids)
    if cfg.eos_token_id:
        return set(cfg.eos_token_id)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return {tokenizer.eos_token_id}
    return set()


def plan(
    model: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    quant: str | None = None,
    **offload_options,
):
    """The placement plan load() would follow, without loading any weights."""
    options = OffloadOptions(**offload_options)
    ckpt = Checkpoint(resolve_model(model))
    device = pick_device(device)
    return plan_model(ckpt, device, pick_dtype(dtype), options, quant).plan


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, where Linux has it: ru_maxrss survives
    exec, so a child of a big process would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory() -> bool:
    """Start the peaks over from what is in use now, so that a measurement counts only what
    follows it. Linux resets VmHWM through clear_refs (4.0+); False where that is refused."""
    gc.collect()  # an earlier engine's cycles are not what follows
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TextStream:
    """Generated ids -> text: incremental decoding, stop strings, pieces to a stream callback
    once they are final (not part of a stop string being formed, no half UTF-8 character).
    Each id costs the same however long the text is."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str] | None, stream=None):
        self.tokenizer, self.stop, self.stream = tokenizer, stop or [], stream
        self.step = tokenizer.decoder() if tokenizer else None
        self.text, self.emitted = "", 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.incomplete = False  # the last id ended inside a character

    def feed(self, token: int) -> bool:
        """The next id; True when a stop string has appeared (the text is cut before it)."""
        if self.step is None:
            return False
        piece = self.step(token)
        self.incomplete = piece is None
        if piece is None:  # an incomplete UTF-8 sequence: wait for its next bytes
            return False
        start = max(0, len(self.text) - self.hold)  # the text before held no stop string
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            return True
        self._emit(len(self.text) - self.hold)
        return False

    def _emit(self, upto: int):
        if self.stream and upto > self.emitted:
            self.stream(self.text[self.emitted : upto])
            self.emitted = upto

    def finish(self, tokens: list[int]) -> str:
        """The whole text of `tokens` (the ids fed), its last pieces streamed."""
        if self.incomplete:  # generation ended inside a character: decode as a whole
            self.text = self.tokenizer.decode(tokens)
        self._emit(len(self.text))
        return self.text


class ReplyText:
    """One reply's text as it is generated: the answer and a reasoning model's reasoning apart
    (reasoning.py), each decoded as it comes; stop strings end the answer only, and the
    whitespace between the reasoning and the answer belongs to neither."""

    def __init__(self, tokenizer, prompt: list[int], stop=None, stream=None,
                 reasoning_stream=None):  # fmt: skip
        self.split = reasoning.splitter(tokenizer, prompt)
        self.stream, self.started = stream, self.split is None
        self.answer = TextStream(tokenizer, stop, self._answer_piece if stream else None)
        self.reasoning = TextStream(tokenizer, None, reasoning_stream)
        self.ids = {reasoning.ANSWER: [], reasoning.REASONING: []}

    def _answer_piece(self, piece: str):
        if not self.started:  # after reasoning, the answer starts at its first visible character
            piece = piece.lstrip()
            self.started = bool(piece)
        if piece:
            self.stream(piece)

    def feed(self, token: int) -> bool:
        """The next id; True when a stop string has appeared in the answer."""
        part = self.split.route(token) if self.split else reasoning.ANSWER
        if part is not None:
            self.ids[part].append(token)
        if part == reasoning.ANSWER:
            return self.answer.feed(token)
        if part == reasoning.REASONING:
            self.reasoning.feed(token)
        return False

    def finish(self) -> tuple[str, str]:
        """(answer, reasoning), their last pieces streamed."""
        thought = self.reasoning.finish(self.ids[reasoning.REASONING])
        answer = self.answer.finish(self.ids[reasoning.ANSWER])
        return (answer if self.split is None else answer.lstrip()), thought.strip()


class PromptCache:
    """A conversation's KV cache, kept between turns: the next prompt prefills only what follows
    the longest prefix it shares with the tokens already cached (as llama.cpp's chat does)."""

    def __init__(self, n_layers: int, capacity: int):
        self.kv = KVCache(n_layers, capacity)
        self.ids: list[int] = []  # the tokens whose keys and values kv holds

    def reuse(self, ids: list[int]) -> int:
        """Keep the shared prefix (at least one prompt token is left to prefill), or nothing
        where the cache cannot be cut there (KVCache.rewind); the tokens kept."""
        n = 0
        for a, b in zip(self.ids, ids[:-1], strict=False):
            if a != b:
                break
            n += 1
        n = self.kv.rewind(n)
        self.ids = self.ids[:n]
        return n

    def clear(self):
        self.kv.rewind(0)
        self.ids = []


class Engine:
    def __init__(
        self,
        model_dir: Path,
        loaded,
        tokenizer: Tokenizer | None,
        device: torch.device,
        baseline_rss_bytes: int = 0,  # RSS before loading: Python, torch
    ):
        self.model_dir = model_dir
        self.model = loaded.model
        self.config: ModelConfig = loaded.cfg
        self.tokenizer = tokenizer
        self.device = device
        self.plan = loaded.plan
        self.expert_cache = loaded.expert_cache
        self.closed = False
        self.baseline_rss_bytes = baseline_rss_bytes
        self.stop_ids = stop_token_ids(model_dir, self.config, tokenizer)
        self.threads = torch.get_num_threads()
        if device.type == "cpu":  # a first run builds the kernels here (~30 s), not in its prompt
            cpu_kernels.isa()
        # what multiplies the quantized matrices: a CPU kernel path (cpu_kernels.path) or torch
        int_cpu = self.plan.quant in ("int8", "int4") and device.type == "cpu"
        self.kernel = cpu_kernels.path() if int_cpu else "torch"

    @property
    def context_length(self) -> int:
        return self.plan.context

    def close(self):
        """Release the expert cache's I/O threads, open files and page-locked memory. The engine
        cannot generate afterwards; closing twice does nothing."""
        if self.expert_cache is not None:
            self.expert_cache.close()
        if isinstance(self.model.model.embed_tokens, DiskEmbedding):
            self.model.model.embed_tokens.close()
        self.closed = True

    def _require_open(self):
        if self.closed:
            raise MoelocalError("this engine is closed; load the model again")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc):
        self.close()

    def memory(self) -> dict:
        """Peak memory per tier so far (bytes)."""
        out = {"peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": self.baseline_rss_bytes}
        if self.device.type == "cuda":
            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.expert_cache is not None:
            out["expert_cache_bytes"] = self.plan.cache_bytes + self.plan.guess_bytes
            out["host_store_bytes"] = self.expert_cache.host_bytes
        return out

    @property
    def stats(self) -> dict:
        """Expert cache figures since load (per layer and total) and peak memory; the totals
        are at the top level too (stats["hits"])."""
        ec = self.expert_cache
        experts = ec.stats.as_dict(ec.expert_bytes) if ec else {}
        totals = {k: v for k, v in experts.items() if k != "per_layer"}
        return totals | {"experts": experts, "memory": self.memory()}

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise MoelocalError(
                f"{self.model_dir}: no tokenizer.json; pass token ids instead of text"
            )
        return self.tokenizer

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self._require_tokenizer().encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise MoelocalError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise MoelocalError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        return ids

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready to generate."""
        return self.encode(self._require_tokenizer().encode_chat(messages))

    def prompt_ids(self, prompt: str, chat_template: bool = True) -> list[int]:
        """A user prompt as token ids (Tokenizer.encode_prompt), checked."""
        return self.encode(self._require_tokenizer().encode_prompt(prompt, chat_template))

    def check_context(self, n_prompt: int, max_new_tokens: int):
        validate.whole("max_new_tokens", max_new_tokens)
        if n_prompt + max_new_tokens > self.context_length:
            raise MoelocalError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's "
                f"context of {self.context_length} tokens"
            )

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        stream: Callable[[str], None] | None = None,
        prompt_cache: PromptCache | None = None,
        reasoning_stream: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate a completion. A str prompt is tokenized as is (no chat template); a list is
        token ids. `stream` receives text pieces as they are final (`reasoning_stream` those of
        a reasoning model's reasoning); `stop` strings end the generation and are cut from the
        text. `prompt_cache` (see new_prompt_cache) carries the KV cache from one call to the
        next, for multi-turn chat."""
        request = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed)  # fmt: skip
        return self.generate_batch([prompt], stop=stop, streams=[stream],
                                   reasoning_streams=[reasoning_stream],
                                   prompt_cache=prompt_cache, **request)[0]  # fmt: skip

    def new_prompt_cache(self) -> PromptCache:
        """A KV cache as long as the context, to pass to successive generate() calls."""
        return PromptCache(self.config.num_hidden_layers, self.context_length)

    def generate_batch(
        self,
        prompts: list[str | list[int]],
        *,
        max_new_tokens: int | list[int] = 128,
        temperature: float | list[float] = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None | list[int | None] = None,
        stop: list[str] | None = None,
        streams: list[Callable[[str], None] | None] | None = None,
        prompt_cache: PromptCache | None = None,
        reasoning_streams: list[Callable[[str], None] | None] | None = None,
        cancelled: list[Callable[[], bool]] | None = None,
    ) -> list[Generation]:
        """Decode several prompts together: every expert loaded serves the whole batch. Per-prompt
        max_new_tokens, temperature and seed may be lists. Greedy results equal one-at-a-time
        (generate.generate says how).
        `cancelled[b]()`, asked after each step, ends row b there (finish_reason "cancelled")."""
        self._require_open()
        B = len(prompts)

        def each(value):
            return list(value) if isinstance(value, list) else [value] * B

        requests = []
        for prompt, n, t, s in zip(prompts, each(max_new_tokens), each(temperature), each(seed),
                                   strict=True):  # fmt: skip
            validate.sampling(t, top_k, top_p, s)
            ids = self.encode(prompt)
            self.check_context(len(ids), n)
            requests.append(Request(ids, n, t, top_k, top_p, s))
        if stop:  # stop strings are found in the text
            self._require_tokenizer()
        pieces = zip(requests, streams or [None] * B, reasoning_streams or [None] * B,
                     strict=True)  # fmt: skip
        texts = [ReplyText(self.tokenizer, r.prompt, stop, fn, rfn) for r, fn, rfn in pieces]
        stats = [Stats() for _ in prompts]
        finished = [False] * B
        ec = self.expert_cache
        before = ec.stats.copy() if ec else None
        tokens: list[list[int]] = [[] for _ in prompts]
        kv = None
        if prompt_cache is not None:
            assert B == 1, "a prompt cache serves one sequence"
            stats[0].extra["cached_prompt_tokens"] = prompt_cache.reuse(requests[0].prompt)
            kv = prompt_cache.kv
        try:
            for step in generate(self.model, requests, stop_ids=self.stop_ids, stats=stats,
                                 finished=finished, kv=kv):  # fmt: skip
                for b, token in enumerate(step):
                    if token is None:
                        continue
                    tokens[b].append(token)
                    if texts[b].feed(token):  # a stop string
                        stats[b].finish_reason, finished[b] = "stop", True
                    elif cancelled and not finished[b] and cancelled[b]():
                        stats[b].finish_reason, finished[b] = "cancelled", True
        except BaseException:
            if prompt_cache is not None:  # interrupted mid-step: what it holds is unknown
                prompt_cache.clear()
            raise
        if prompt_cache is not None:  # the last token was sampled, never fed back
            prompt_cache.ids = (requests[0].prompt + tokens[0])[: kv.length]
        extra = {"memory": self.memory(), "kernel": self.kernel, "threads": self.threads,
                 "context": self.context_length}  # fmt: skip
        if ec is not None:  # a batch shares its experts: the figures are the batch's
            extra["experts"] = ec.stats.since(before).as_dict(ec.expert_bytes)
        out = []
        for b in range(B):
            stats[b].extra.update(extra)
            answer, thought = texts[b].finish()
            out.append(Generation(answer, requests[b].prompt, tokens[b], stats[b], thought))
        return out

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position: float32 tensor of shape [len(token_ids), vocab]."""
        self._require_open()
        ids = self.encode(list(token_ids))
        self.check_context(len(ids), 0)
        kv = KVCache(self.config.num_hidden_layers, len(ids))
        tokens = torch.tensor([ids], device=self.device)
        chunks = tokens.split(PREFILL_CHUNK, dim=1)  # as a prefill does: bounded activations
        return torch.cat([self.model(chunk, kv)[0].float().cpu() for chunk in chunks])
