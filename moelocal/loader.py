"""Checkpoint -> model: every tensor sorted into resident weights or routed experts by a key table.

The resident model is built on the meta device and its weights are assigned from the lazy reader,
so nothing is allocated twice. Routed experts never become parameters: the model is built with
its expert cache, which reads them by file offset into its slots. A checkpoint key the table does
not map is an error naming it.
"""

import re
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import disk_embedding, predictor
from .checkpoint import Checkpoint
from .config import DTYPES, ModelConfig
from .direct_io import IO_THREADS
from .errors import MoelocalError
from .expert_cache import ExpertCache
from .experts import ExpertLayout
from .io_queue import IOQueue
from .models import FAMILIES
from .models.attention import Attention
from .models.common import Rotary, on_meta
from .models.family import Family
from .models.moe import router_dtype
from .models.transformer import Transformer
from .movers import CpuMover, CudaMover
from .plan import ROUTER, OffloadOptions, Plan, make_plan, resident_components
from .prefetch import Prefetcher
from .quant import check_mode, dequantize_checkpoint, quantize_linears
from .store import (
    DiskReader,
    check_shapes,
    expert_pieces,
    packed_pieces,
    staged_bytes,
    tensor_offsets,
)

EMBEDDINGS = "model.embed_tokens.weight"

# per-expert matrices, as transformers saves them
EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
# experts already stacked on disk: gate_up_proj (E, 2I, D) and down_proj (E, D, I) (or as the
# family's storage says), with their biases or as MXFP4 blocks and scales
FUSED_EXPERT_KEY = re.compile(
    r"model\.layers\.(\d+)\.mlp\.experts\.((?:gate_up|down)_proj(?:_bias|_blocks|_scales)?)"
)
UNUSED_KEY = re.compile(r".*rotary_emb\.inv_freq")
# the quant state beside a quantized weight X.weight: bitsandbytes' (transformers' load_in_4bit
# and load_in_8bit) or FP8's block scales (DeepSeek-V3 as published)
QUANT_AUX = re.compile(
    r"(.*)\.(?:weight\.(absmax|quant_map|nested_absmax|nested_quant_map|"
    r"quant_state\.bitsandbytes__(?:nf4|fp4))|(SCB|weight_scale_inv)|(weight_format))"
)


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Transformer  # built with its expert cache and prefetcher
    plan: Plan
    expert_cache: ExpertCache | None  # None for a model without routed experts


def family_of(raw_config: dict) -> Family:
    model_type = raw_config.get("model_type")
    if model_type not in FAMILIES:
        raise MoelocalError(
            f"unsupported model_type '{model_type}' (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def sort_keys(ckpt: Checkpoint, family: Family, cfg: ModelConfig, expected: set[str]):
    """-> (resident: our name -> checkpoint key, experts: (layer, expert, part) -> key, fused,
    quant_state: weight key -> {quant-state suffix: key} for weights stored quantized)."""
    resident, experts, fused, quant_state = {}, {}, {}, {}
    for key in ckpt.keys():
        if m := QUANT_AUX.fullmatch(key):
            suffix = m.group(2) or m.group(3)
            if suffix:  # weight_format is a label, nothing to read
                quant_state.setdefault(f"{m.group(1)}.weight", {})[suffix] = key
            continue
        if family.ignore(key, cfg):
            continue
        name = key
        for old, new in family.renames.items():
            name = name.replace(old, new)
        if name in expected:
            resident[name] = key
        elif m := EXPERT_KEY.fullmatch(name):
            part = family.expert_names.get(m.group(3))
            if part is None:
                raise MoelocalError(
                    f"unexpected expert tensor {key} in the {family.name} key table"
                )
            layer, e = int(m.group(1)), int(m.group(2))
            check_expert_key(key, cfg, layer, e)
            experts[layer, e, part] = key
        elif m := FUSED_EXPERT_KEY.fullmatch(name):
            check_expert_key(key, cfg, int(m.group(1)))
            fused[int(m.group(1)), m.group(2)] = key
        elif not UNUSED_KEY.fullmatch(name):
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise MoelocalError(f"unexpected tensor {key}: not in the {family.name} key table")
    return resident, experts, fused, quant_state


def check_expert_key(key: str, cfg: ModelConfig, layer: int, expert: int = 0):
    """An expert tensor of a layer or expert config.json does not have is an error, never
    silently ignored: the checkpoint and the config disagree."""
    if not (layer < cfg.num_hidden_layers and cfg.moe_layers[layer]):
        raise MoelocalError(f"unexpected tensor {key}: config.json has no MoE layer {layer}")
    if expert >= cfg.num_experts:
        raise MoelocalError(f"unexpected tensor {key}: config.json has {cfg.num_experts} experts")


def bnb_quant(raw_config: dict) -> str | None:
    """The format of a bitsandbytes-quantized checkpoint: nf4, fp4 or int8 (LLM.int8)."""
    q = raw_config.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes":
        return None
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return "int8"
    return q.get("bnb_4bit_quant_type", "fp4")


def checkpoint_quant(raw_config: dict, device: torch.device) -> str | None:
    """The --quant a checkpoint runs in unless told otherwise: a bitsandbytes checkpoint's own
    format; for MXFP4 experts (gpt-oss), 4-bit, as close as the device has (int4 on the CPU,
    nf4 on CUDA), and int8 for FP8 weights (DeepSeek-V3), not bf16 at twice to four times the
    size."""
    q = raw_config.get("quantization_config") or {}
    if q.get("quant_method") == "mxfp4":
        return "int4" if device.type == "cpu" else "nf4"
    if q.get("quant_method") == "fp8":  # 8 bits in, 8.5 out: int8 keeps nearly every bit
        return "int8"
    return bnb_quant(raw_config)


def read_weight(ckpt: Checkpoint, key: str, quant_state: dict) -> torch.Tensor:
    """A tensor by key; a weight stored quantized (bitsandbytes, FP8) comes back dequantized."""
    if key not in quant_state:
        return ckpt.get(key)
    return dequantize_checkpoint(ckpt.get(key), ckpt.quant_state(quant_state[key]))


class Planned(NamedTuple):
    """Everything decided before a byte of weights is read."""

    family: Family
    cfg: ModelConfig
    dtype: torch.dtype
    model: Transformer  # on the meta device
    resident: dict[str, str]  # module name -> checkpoint key
    pieces: dict  # (layer, expert) -> its pieces on disk
    plan: Plan
    layout: ExpertLayout
    quant_state: dict  # key of a weight stored quantized -> its quant-state keys


def plan_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype | None,
    options: OffloadOptions,
    quant: str | None = None,
) -> Planned:
    """Family, config, the model on the meta device, resident keys, each expert's pieces on
    disk, and the placement within the budgets: checked before anything is loaded."""
    family = family_of(ckpt.config)
    cfg = family.read_config(ckpt.config)
    if ckpt.manifest is not None:  # a converted model fixes its dtype and quantization
        packed = (DTYPES[ckpt.manifest["dtype"]], ckpt.manifest["quant"])
        if (dtype or packed[0], quant or packed[1]) != packed:
            raise MoelocalError(
                f"{ckpt.dir} was converted for {ckpt.manifest['dtype']} and --quant {packed[1]}: "
                "load it without --dtype/--quant, or convert again"
            )
        dtype, quant = packed
    # a checkpoint stored quantized runs in its format, or the nearest, unless told otherwise
    dtype = dtype or cfg.dtype
    quant = check_mode(quant or checkpoint_quant(ckpt.config, device), device) or "none"
    with on_meta():
        model = family.build(cfg)
    sizes = resident_components(
        model, dtype, quant, lambda name: keep_dense(name, cfg), router_dtype(dtype, device)
    )
    if computed_resident(ckpt):  # stored as it computes: check against that shape of the model
        compute_layout(model, cfg, quant, dtype, empty=True)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if computed_resident(ckpt):
        resident, expert_keys, fused, quant_state = {n: n for n in ckpt.keys()}, {}, {}, {}
        unexpected = sorted(set(resident) - expected)
        if unexpected:
            raise MoelocalError(f"{ckpt.dir}: unexpected tensor {unexpected[0]} in "
                                f"{ckpt.weight_map[unexpected[0]]}")  # fmt: skip
    else:
        resident, expert_keys, fused, quant_state = sort_keys(ckpt, family, cfg, expected)
        if line := family.notice(ckpt.keys()):
            print(f"moelocal: {line}", file=sys.stderr)
    missing = sorted(expected - set(resident))
    if missing:
        raise MoelocalError(
            f"{ckpt.dir}: checkpoint lacks tensor {missing[0]} ({len(missing)} missing)"
        )
    moe_layers = [i for i, is_moe in enumerate(cfg.moe_layers) if is_moe]
    if ckpt.manifest is not None:
        pieces = packed_pieces(ckpt, moe_layers, cfg.num_experts)
    else:
        pieces = expert_pieces(ckpt, moe_layers, cfg.num_experts, expert_keys, fused, quant_state,
                               family.experts_transposed, family.gate_up_interleaved)  # fmt: skip
    layout = ExpertLayout(cfg.hidden_size, cfg.moe_intermediate_size, dtype, quant,
                          cfg.expert_bias)  # fmt: skip
    check_shapes(pieces, layout)
    # RAM slots are aligned; a CUDA mover's page-locked staging pieces need not be
    largest = staged_bytes(pieces, aligned_dest=device.type == "cpu")
    # experts read from a Hugging Face checkpoint are converted as they are read
    quantize_on_read = ckpt.manifest is None and (
        quant != "none" or not all(p.plain for parts in pieces.values() for p in parts)
    )
    # a plain table of its own (not the head, not stored quantized) can be read row by row
    readable = (device.type == "cpu" and disk_embedding.AVAILABLE and not cfg.tie_word_embeddings
                and resident.get(EMBEDDINGS) not in (None, *quant_state))  # fmt: skip
    plan = make_plan(cfg, sizes, dtype, device, options, largest, layout.nbytes, quant,
                     quantize_on_read, readable)  # fmt: skip
    return Planned(family, cfg, dtype, model, resident, pieces, plan, layout, quant_state)


def computed_resident(ckpt: Checkpoint) -> bool:
    """A converted model whose resident weights are stored as they compute (format 3: q, k, v
    fused and Linear layers quantized); older ones hold the checkpoint's and quantize at load."""
    return ckpt.manifest is not None and ckpt.manifest.get("resident") == "compute"


def compute_layout(model, cfg: ModelConfig, quant: str, dtype=None, empty: bool = False):
    """The resident model as it computes: q, k and v in one projection (quantized formats) and
    its Linear layers quantized, in place. empty: the same shapes on the meta device, for a state
    stored that way to be assigned."""
    if quant != "none":
        for m in model.modules():
            if isinstance(m, Attention):
                m.fuse_qkv()
    quantize_linears(model, quant, lambda name: keep_dense(name, cfg), dtype, empty)


def resident_state(ckpt: Checkpoint, planned: Planned, device: torch.device,
                   skip: tuple = ()) -> dict:  # fmt: skip
    """The resident weights by module name, on device, in their dtypes (routers in
    router_dtype); a tied head is the embeddings. The names in skip are not read: each is an
    empty tensor of its stored shape on the meta device (its module reads it another way)."""
    cfg, dtype = planned.cfg, planned.dtype
    stored = computed_resident(ckpt)
    want = {name: t.shape for name, t in planned.model.state_dict().items()}
    state = {}
    for name, key in planned.resident.items():
        if name in skip:
            state[name] = torch.empty(ckpt.shape(key), device="meta")
            continue
        t = read_weight(ckpt, key, planned.quant_state)
        shape = want.get(name)
        if shape is not None and t.shape != shape and t.squeeze(0).shape == shape:
            t = t.squeeze(0)  # ERNIE stores its (E,) correction bias as (1, E)
        # a stored quantized segment keeps its dtype; float weights take the compute dtype
        t = t.to(device) if stored else t.to(device=device, dtype=dtype)
        state[name] = aligned(t)
    for name in [name for name in state if ROUTER in name]:  # their values stay in dtype
        state[name] = state[name].to(router_dtype(dtype, device))
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, copied if it is a float tensor in RAM not on a 64-byte boundary. On some CPUs MKL's
    float sums depend on where a matrix lies (AMD EPYC: a vector times a matrix 8 bytes off
    differs in the last bits), and a safetensors file puts a tensor wherever the ones before it
    end: so a model and its converted copy, or one sharded another way, gave other logits."""
    if t.device.type == "cpu" and t.is_floating_point() and t.data_ptr() % 64:
        return t.clone()
    return t


def stored_at(ckpt: Checkpoint, key: str) -> tuple:
    """(file, offset, bytes, dtype, shape) of a tensor in its safetensors file."""
    path = ckpt.dir / ckpt.weight_map[key]
    return path, *tensor_offsets(path)[key]


def embedding_from_disk(ckpt: Checkpoint, planned: Planned) -> disk_embedding.DiskEmbedding:
    """The embedding table read from its file row by row, in the dtype resident_state would
    give it."""
    path, offset, _, stored, shape = stored_at(ckpt, planned.resident[EMBEDDINGS])
    dtype = stored if computed_resident(ckpt) else planned.dtype
    if not stored.is_floating_point or len(shape) != 2:
        raise MoelocalError(f"{path}: the embedding table is {stored} of shape {shape}, not a "
                            "float matrix")  # fmt: skip
    return disk_embedding.DiskEmbedding(path, offset, stored, shape, dtype)


def keep_dense(linear_name: str, cfg: ModelConfig) -> bool:
    """Linear layers that stay unquantized: Qwen2-MoE's one-output shared-expert gate, and a
    head tied to the embeddings (which must stay as they are)."""
    return linear_name.endswith("shared_expert_gate") or (
        linear_name == "lm_head" and cfg.tie_word_embeddings
    )


def load_model(
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype | None,
    options: OffloadOptions,
    quant: str | None = None,
    preread=None,
) -> LoadedModel:
    """preread: the experts' early reads (preread.py), kept if they read what this load plans
    (closed by the caller)."""
    planned = plan_model(ckpt, device, dtype, options, quant)
    family, cfg, dtype, model, resident, pieces, plan, layout, quant_state = planned
    for note in plan.notes:
        print(f"moelocal: {note}", file=sys.stderr)
    most_slots = max(plan.layer_slots(), default=0)  # rows of a layer the preread must hold
    if preread is not None and not (
        device.type == "cpu" and preread.keep(pieces, layout.nbytes, most_slots)
    ):
        preread = None
    on_disk = "embeddings" in plan.on_disk
    state = resident_state(ckpt, planned, device, skip=(EMBEDDINGS,) if on_disk else ())
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, t in state.items():
        if name in want and tuple(t.shape) != want[name]:
            raise MoelocalError(f"{ckpt.dir}: {resident.get(name, name)} has shape "
                                f"{tuple(t.shape)}, config.json implies {want[name]}")  # fmt: skip
    try:  # checked on the planned model, before any expert is read
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MoelocalError(
            f"{ckpt.dir}: weights do not match config.json ({e})".split("\n")[0]
        ) from None
    embedding = embedding_from_disk(ckpt, planned) if on_disk else None
    ckpt.close()  # experts are read by offset from here on; drop the memory maps
    moe_layers = sorted({layer for layer, _ in pieces})
    try:
        cache = (
            open_expert_cache(pieces, layout, plan, moe_layers, device, options, preread)
            if moe_layers
            else None
        )
    except BaseException:
        if embedding is not None:
            embedding.close()
        raise
    try:
        prefetcher = None
        if cache is not None and options.prefetch and cache.streaming:
            prefetcher = Prefetcher(cache, options.prefetch_margin, options.prefetch_depth)
        with on_meta():
            model = family.build(cfg, cache, prefetcher)
        if prefetcher is not None:
            prefetcher.model = model
        stored = computed_resident(ckpt)
        if stored:
            compute_layout(model, cfg, plan.quant, dtype, empty=True)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary = Rotary(family.rope_dim(cfg), cfg.rope).to(device)
        if not stored:
            compute_layout(model, cfg, plan.quant)
        if embedding is not None:
            model.model.embed_tokens = embedding
        if cache is not None:
            model.route_predictors = route_predictors(model, device)
            if model.route_predictors is not None:
                cache.evict_by(model.route_predictors.reuse)
            if prefetcher is not None:
                prefetcher.predictors = model.route_predictors
    except BaseException:
        if cache is not None:
            cache.close()
        if embedding is not None:
            embedding.close()
        raise
    return LoadedModel(cfg, model.eval(), plan, cache)


def route_predictors(model, device: torch.device):
    """The fitted guesses of later layers' routing stored for this model (predictor.py), if
    any; a stored file that cannot be used is said in one line and left alone."""
    predictors, note = predictor.find(model)
    if note:
        print(f"moelocal: {note}", file=sys.stderr)
    return predictors.to(device) if predictors is not None else None


def open_expert_cache(pieces: dict, layout: ExpertLayout, plan: Plan, moe_layers: list[int],
                      device: torch.device, options: OffloadOptions,
                      preread=None) -> ExpertCache:  # fmt: skip
    """The expert cache, its slots filled; its reader, I/O threads and mover released if that
    fails."""
    reader, queue = DiskReader(pieces, layout), IOQueue(IO_THREADS)
    try:
        if device.type == "cuda":
            mover = CudaMover(reader, queue, device, moe_layers, plan.host_experts,
                              plan.cpu_miss_tokens)  # fmt: skip
        else:
            mover = CpuMover(reader, queue)
    except BaseException:
        queue.close()
        reader.close()
        raise
    try:
        cache = ExpertCache(layout, mover, moe_layers, plan.n_experts, plan.layer_slots(),
                            options.cache_policy, preread, plan.guess_rows)  # fmt: skip
    except BaseException:
        mover.close()
        raise
    reader.trim = cache.streaming  # from now on, after each expert converted as it is read
    return cache
