"""Budgets -> placement: what stays resident, how many expert slots the device cache gets, what the
host store holds and what stays on disk. Checked before anything is loaded.

The planner knows sizes, not tensors: it builds the model on the meta device to count the
resident bytes by component. It does not move anything (store.py and expert_cache.py do).
"""

import re
from dataclasses import dataclass, field

import psutil
import torch
from rich.table import Table

from . import memory_room
from .config import ModelConfig
from .direct_io import ALIGN, IO_THREADS
from .errors import MoelocalError
from .generate import PREFILL_CHUNK
from .quant import MatrixFormat
from .slot_map import POLICIES

# --miss-policy auto on CUDA: a miss routed to this many tokens or fewer runs on the CPU from
# host RAM, more are copied to the GPU. One token's expert is a matrix-vector product that reads
# the weights once, about as fast from host RAM as a copy over PCIe; a batch reuses the copy.
# A fixed number, not a timing: the tokens must not depend on how fast a run happened to be.
AUTO_CPU_TOKENS = 4
# without --cpu-mem, memory left out of the plan's budget where the process's room is what bounds
# it: what is allocated beyond the budget (README: 64 MiB measured) and some slack
ROOM_MARGIN = 128 * 2**20

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
         "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
         "tib": 1024**4}  # fmt: skip


def parse_size(value: str | int | None, option: str = "size") -> int | None:
    """'6GiB', '512MB', '1.5g' or a number of bytes -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in UNITS:
        raise MoelocalError(f"{option} '{value}' is not a size (e.g. 6GiB, 512MB, 1.5GB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


ROUTER = ".mlp.gate."  # in the names of the routers' parameters


def resident_components(
    model: torch.nn.Module,
    dtype: torch.dtype,
    quant: str = "none",
    keep_dense=lambda name: False,
    router_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Bytes of the resident weights by component, in the compute dtype (routers in
    router_dtype) or, for the Linear layers that get quantized, in their quantized format."""
    quantized = {
        f"{name}.weight": MatrixFormat(quant, *m.weight.shape, dtype).nbytes
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and quant != "none" and not keep_dense(name)
    }
    parts = {"embeddings": 0, "lm_head": 0, "attention": 0, "norms": 0, "routers": 0,
             "shared_experts": 0, "dense_mlp": 0}  # fmt: skip
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        if "embed_tokens" in name:
            part = "embeddings"
        elif name.startswith("lm_head"):
            part = "lm_head"
        elif (".self_attn." in name or ".linear_attn." in name) and "norm" not in name:
            part = "attention"
        elif "norm" in name:
            part = "norms"
        elif ROUTER in name:
            part = "routers"
        elif ".shared_expert" in name:
            part = "shared_experts"
        else:
            part = "dense_mlp"
        itemsize = (router_dtype or dtype).itemsize if part == "routers" else dtype.itemsize
        parts[part] += quantized.get(name, p.numel() * itemsize)
    return parts


def prefill_bytes_for(cfg: ModelConfig, context: int) -> int:
    """Activations of one prefill pass over min(context, PREFILL_CHUNK) tokens, about: float32
    rows of an MLP's gate and up outputs and some eight of the hidden state's. Measured peaks
    over a warmed-up process: mixtral-large (2048, 5632) 118 KB a token from 256 to 4000 tokens
    (this says 110), mixtral-medium (1024, 3584) 63 KB (this says 61)."""
    widest = max(cfg.intermediate_size or 0, cfg.moe_intermediate_size,
                 cfg.shared_expert_intermediate_size)  # fmt: skip
    return min(context, PREFILL_CHUNK) * 4 * (2 * widest + 8 * cfg.hidden_size)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Linear attention layers hold a fixed state instead (a few MB a sequence), not counted."""
    if cfg.kv_lora_rank:  # latent attention caches the latent and the shared rotary key
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim
    attention_layers = cfg.num_hidden_layers - sum(cfg.linear_layers)
    return per_layer * attention_layers * dtype.itemsize


@dataclass
class OffloadOptions:
    """The offloading knobs of load() and of every command that loads a model."""

    gpu_mem: int | None = None  # bytes; on CUDA: resident weights + KV cache + expert slots
    cpu_mem: int | None = None  # bytes; on CUDA: the host store; on CPU: everything
    cache_experts: int | None = None  # expert slots per layer, overriding the budgets
    cache_policy: str = "learned"  # LRU where the model has no fitted eviction scores
    prefetch: bool = True
    prefetch_margin: int = 1  # extra experts guessed beyond the router's top-k
    prefetch_depth: int = 1  # each layer's experts are guessed this many layers before it runs
    miss_policy: str = "auto"  # CUDA: load a missing expert, run it on the CPU, or choose by tokens
    context: int | None = None  # tokens of KV cache to plan for (default: the model's context)

    def __post_init__(self):
        self.gpu_mem = parse_size(self.gpu_mem, "--gpu-mem")
        self.cpu_mem = parse_size(self.cpu_mem, "--cpu-mem")
        if self.cache_policy not in POLICIES:
            raise MoelocalError(f"--cache-policy '{self.cache_policy}': choose one of "
                                f"{', '.join(POLICIES)}")  # fmt: skip
        if self.miss_policy not in ("auto", "load", "cpu"):
            raise MoelocalError(f"--miss-policy '{self.miss_policy}': choose auto, load or cpu")
        if self.prefetch_margin < 0:
            raise MoelocalError(f"--prefetch-margin {self.prefetch_margin}: must be >= 0")
        if self.prefetch_depth < 1:
            raise MoelocalError(f"--prefetch-depth {self.prefetch_depth}: must be at least 1")
        if self.context is not None and self.context < 1:
            raise MoelocalError(f"--context {self.context}: must be at least 1 token")


@dataclass
class Plan:
    device: str
    dtype: torch.dtype
    quant: str
    resident: dict[str, int]
    context: int
    kv_bytes: int
    expert_bytes: int  # one expert, all its matrices, in the compute dtype
    n_experts: int  # routed experts per MoE layer
    moe_layers: int
    top_k: int
    layers: int  # decoder layers, MoE or not
    device_slots: int  # expert slots per MoE layer in the device cache (extra_slots have one more)
    host_experts: int  # experts kept in page-locked host RAM (CUDA); 0 on a CPU-only machine
    staging_bytes: int
    # CUDA: a miss held in host RAM routed to at most this many tokens runs on the CPU
    cpu_miss_tokens: int = 0
    gpu_budget: int | None = None
    cpu_budget: int | None = None
    notes: list[str] = field(default_factory=list)
    on_disk: dict[str, int] = field(default_factory=dict)  # parts read from disk as needed
    # MoE layers given one slot more than device_slots: the budget's room short of a slot for
    # every layer (up to a layer's worth of experts: 3 GB for Mixtral-8x7B int4's 32 layers)
    extra_slots: int = 0
    prefill_bytes: int = 0  # a prefill pass's activations, held in a CPU budget
    # spare rows the prefetcher's guesses are read into, beside the slots: a wrong guess evicts
    # nothing (expert_cache.py); only where experts stream and prefetch is on
    guess_rows: int = 0

    def layer_slots(self) -> list[int]:
        """Slots of each MoE layer, in order: the extra slots spread evenly over the layers."""
        n, extra = self.moe_layers, self.extra_slots
        return [self.device_slots + (j + 1) * extra // n - j * extra // n for j in range(n)]

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def fixed_bytes(self) -> int:
        """What a CPU budget holds besides the expert slots."""
        held = self.kv_bytes + self.staging_bytes + self.prefill_bytes + self.guess_bytes
        return self.resident_bytes + held

    @property
    def total_experts(self) -> int:
        return self.n_experts * self.moe_layers

    @property
    def cache_slots(self) -> int:
        return self.device_slots * self.moe_layers + self.extra_slots

    @property
    def cache_bytes(self) -> int:
        return self.cache_slots * self.expert_bytes

    @property
    def guess_bytes(self) -> int:
        return self.guess_rows * self.expert_bytes

    @property
    def disk_experts(self) -> int:
        in_memory = self.host_experts if self.device == "cuda" else self.cache_slots
        return max(0, self.total_experts - in_memory)

    def bytes_read_per_token(self) -> int:
        """Weights a decoded token reads: every resident matrix but the embedding table (one
        row of it, unless it is also the head), and k experts in each MoE layer."""
        resident = self.resident_bytes
        if self.resident.get("lm_head"):
            resident -= self.resident.get("embeddings", 0)
        return resident + self.moe_layers * self.top_k * self.expert_bytes

    def bytes_moved_per_token(self, hit_rate: float) -> float:
        """Expected bytes moved into the expert cache per decoded token at a given hit rate:
        each needed expert not already cached is moved once, by a miss or a right guess (the
        stats' bytes_moved; wrong guesses add to it)."""
        return self.moe_layers * self.top_k * (1 - hit_rate) * self.expert_bytes

    def table(self) -> Table:
        """Each part, its bytes and where it lives, for a terminal."""
        device_name = "GPU" if self.device == "cuda" else "RAM"
        table = Table(title=f"plan ({self.device}, {str(self.dtype).removeprefix('torch.')}, "
                      f"quant {self.quant})")  # fmt: skip
        for column in ("part", "bytes", "where"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for part, n in self.resident.items():
            if n:
                table.add_row(part.replace("_", " "), human(n), f"{device_name} (resident)")
        for part, n in self.on_disk.items():
            table.add_row(part.replace("_", " "), human(n), "disk (a row a token)")
        table.add_row(f"KV cache, {self.context} tokens", human(self.kv_bytes),
                      f"{device_name} (resident)")  # fmt: skip
        slots = f"{self.device_slots}" + (f"-{self.device_slots + 1}" if self.extra_slots else "")
        table.add_row(
            f"expert cache: {slots} of {self.n_experts} slots × {self.moe_layers} layers",
            human(self.cache_bytes), device_name,
        )  # fmt: skip
        if self.guess_rows:
            table.add_row(f"prefetch: {self.guess_rows} experts' rows", human(self.guess_bytes),
                          f"{device_name} (guesses read ahead)")  # fmt: skip
        if self.device == "cuda":
            table.add_row(f"host store: {self.host_experts} experts",
                          human(self.host_experts * self.expert_bytes),
                          "RAM (page-locked)")  # fmt: skip
        table.add_row(f"disk: {self.disk_experts} experts",
                      human(self.disk_experts * self.expert_bytes), "read on demand")  # fmt: skip
        return table

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quant": self.quant,
            "resident_bytes": self.resident_bytes,
            "resident": self.resident,
            "on_disk": self.on_disk,
            "context": self.context,
            "kv_cache_bytes": self.kv_bytes,
            "expert_bytes": self.expert_bytes,
            "experts_per_layer": self.n_experts,
            "moe_layers": self.moe_layers,
            "layers": self.layers,
            "device_slots_per_layer": self.device_slots,
            "device_slots": self.layer_slots(),
            "guess_rows": self.guess_rows,
            "device_cache_bytes": self.cache_bytes,
            "host_experts": self.host_experts,
            "disk_experts": self.disk_experts,
            "staging_bytes": self.staging_bytes,
            "prefill_bytes": self.prefill_bytes,
            "cpu_miss_tokens": self.cpu_miss_tokens,
            "gpu_budget": self.gpu_budget,
            "cpu_budget": self.cpu_budget,
            "notes": self.notes,
        }


def make_plan(
    cfg: ModelConfig,
    resident: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    options: OffloadOptions,
    largest_read: int,
    expert_bytes: int,
    quant: str = "none",
    quantize_on_read: bool = False,
    embeddings_readable: bool = False,
) -> Plan:
    """Fit the model into the budgets, or fail with one line naming the minimum.
    resident: bytes by component (resident_components); largest_read: bytes of the largest
    matrix read from disk (one staging buffer); expert_bytes: one expert's blob;
    embeddings_readable: the embedding table can be read from disk a row at a time
    (disk_embedding.py)."""
    gpu_mem, cpu_mem, cache_experts = options.gpu_mem, options.cpu_mem, options.cache_experts
    context = options.context
    cuda = device.type == "cuda"
    # on CUDA the GPU budget holds the resident part and the slots; on CPU, cpu_mem holds all
    budget = gpu_mem if cuda else cpu_mem
    moe_layers, E = sum(cfg.moe_layers), cfg.num_experts
    # CUDA also stages each expert whole in pinned memory before its copy to the GPU
    staging = IO_THREADS * (largest_read + 2 * ALIGN + (expert_bytes if cuda else 0))
    if quantize_on_read:  # quantizing on load works on float32 copies of a matrix pair
        staging += IO_THREADS * 4 * 2 * cfg.moe_intermediate_size * cfg.hidden_size * 4

    def kv_for(budget) -> tuple[int, int]:  # the context to plan for, and its KV cache's bytes
        n = context
        if n is None:  # a budget plans for a llama.cpp-like default context, not 128k
            n = 4096 if budget is not None else cfg.max_position_embeddings
        n = min(n, cfg.max_position_embeddings)
        return n, kv_bytes_per_token(cfg, dtype) * n

    def fixed_for(resident: dict, n: int) -> int:
        """What the budget holds besides the expert slots at a context of n tokens: on the CPU
        also the I/O threads' staging and a prefill pass's activations (a 4000-token prompt's,
        400 MiB for mixtral-large, got a process planned without them killed under its cap)."""
        held = 0 if cuda else staging + prefill_bytes_for(cfg, n)
        return sum(resident.values()) + kv_bytes_per_token(cfg, dtype) * n + held

    def everything(resident: dict, n: int) -> int:  # every expert its slot (a CPU budget)
        return fixed_for(resident, n) + moe_layers * E * expert_bytes

    context, kv = kv_for(budget)
    notes = []
    if budget is None and not cuda and cache_experts is None and moe_layers:
        # no --cpu-mem: every expert in RAM if the process may take that much, else within
        # what it may take (a container's limit is a hard one: past it the process is killed)
        room = max(0, memory_room.available() - ROOM_MARGIN)
        if everything(resident, context) > room:
            budget = room
            context, kv = kv_for(budget)
            notes.append(f"{human(room)} of memory is free to this process (RAM, or its cgroup's "
                         "limit): planned within it; --cpu-mem sets the budget")  # fmt: skip
    on_disk = {}
    streams = (
        cache_experts is None and budget is not None and everything(resident, context) > budget
    )
    if embeddings_readable and not cuda and streams:
        # the experts stream: a token's row of the table is read with them, not held
        on_disk["embeddings"] = resident["embeddings"]
        resident = {part: n for part, n in resident.items() if part != "embeddings"}
    name = "--gpu-mem" if cuda else "--cpu-mem"
    extra = guess_rows = 0
    # rows a step's guesses are read into, where experts stream: a guess of each layer in flight
    # (a guess starts reading once the layer it was made at has asked for its misses, so at most
    # `depth` layers' guesses read at once, the next token's layer 0 counted as one of them).
    # They come out of the slots' room: under memcap's 1024 MiB cap mixtral-large int4's hit
    # rate was 0.383 with 4 rows (k more for layer 0), 0.397 with these 2, 0.423 with none
    wanted_rows = cfg.num_experts_per_tok * options.prefetch_depth if options.prefetch else 0
    if moe_layers == 0:
        slots = 0
    elif cache_experts is not None:
        if not 1 <= cache_experts <= E:
            raise MoelocalError(f"--cache-experts {cache_experts}: must be between 1 and {E}")
        slots = cache_experts
        guess_rows = wanted_rows if slots < E else 0
    elif budget is None:
        slots = E
    else:

        def needs(n: int) -> int:  # a slot a layer beside the rest
            return fixed_for(resident, n) + moe_layers * expert_bytes

        if options.context is None:  # a budget's default: halved while it does not fit
            halved = [context >> i for i in range(6) if context >> i >= min(256, context)]
            fits = [n for n in halved if needs(n) <= budget]
            if fits and fits[0] < context:
                context, kv = fits[0], kv_bytes_per_token(cfg, dtype) * fits[0]
                notes.append(f"planned a context of {context} tokens: the budget holds no more "
                             "beside a slot a layer; --context sets it")  # fmt: skip
        minimum = needs(context)
        if budget < minimum:
            given = (f"only {human(budget)} is free to this process" if notes
                     else f"{name} {human(budget)} is too small")  # fmt: skip
            raise MoelocalError(
                f"model needs at least {human(minimum)} in {'GPU' if cuda else 'RAM'} (resident "
                f"{human(sum(resident.values()))}, KV cache for {context} tokens {human(kv)}, "
                f"{'' if cuda else 'a prefill pass, '}one expert slot per layer); {given}; a "
                "smaller --context needs less"
            )
        free = budget - fixed_for(resident, context)
        if free < moe_layers * E * expert_bytes:  # streams: guesses' rows, beyond a slot a layer
            guess_rows = min(wanted_rows, free // expert_bytes - moe_layers)
            free -= guess_rows * expert_bytes
        slots = min(E, free // (moe_layers * expert_bytes))
        # what is left after that many slots in every layer: one more in as many as it holds
        left = free - slots * moe_layers * expert_bytes
        if slots < E:
            extra = min(moe_layers - 1, left // expert_bytes)
    host = 0
    if cuda:  # the host store: whole layers' shares of what --cpu-mem (or free RAM) holds
        host_budget = cpu_mem if cpu_mem is not None else default_host_budget()
        room = max(0, (host_budget - staging) // expert_bytes)
        host = min(E, room // max(1, moe_layers)) * moe_layers
    cpu_miss_tokens = {"load": 0, "cpu": 2**62, "auto": AUTO_CPU_TOKENS}[options.miss_policy]
    return Plan(
        device=device.type, dtype=dtype, quant=quant, resident=resident, context=context,
        kv_bytes=kv, expert_bytes=expert_bytes, n_experts=E, moe_layers=moe_layers,
        top_k=cfg.num_experts_per_tok, layers=cfg.num_hidden_layers, device_slots=int(slots),
        host_experts=int(host), staging_bytes=staging,
        cpu_miss_tokens=cpu_miss_tokens if cuda else 0,
        gpu_budget=gpu_mem, cpu_budget=cpu_mem, notes=notes, on_disk=on_disk,
        extra_slots=int(extra), prefill_bytes=0 if cuda else prefill_bytes_for(cfg, context),
        guess_rows=int(guess_rows),
    )  # fmt: skip


def default_host_budget() -> int:
    """The host store's budget on CUDA without --cpu-mem: half the RAM free now, leaving the
    rest to the OS, the page cache and other programs (page-locked memory cannot be swapped)."""
    return psutil.virtual_memory().available // 2
