"""Synthetic Mixtral-shaped checkpoints in Hugging Face layout, with random weights.

They give tests and benchmarks checkpoints of any shape on a machine without a model hub
(scripts/make_checkpoint.py); the embedded default model is a trained one (embedded_model.py).
Deterministic: the same preset and seed give the same bytes. Written to a temporary directory and
renamed into place, so an interrupted run never leaves a half-written model.
"""

import itertools
import json
import os
import re
import shutil
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import MoelocalError
from .model_files import foreign_files

PRESETS = {
    # small enough to create in a second or two (the shape of the first, random, default model)
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_local_experts=8,
                    num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=4,
                    vocab_size=2048, dtype="bfloat16"),
    # about 0.8 B parameters: the benchmark checkpoint of the offloading and quantization work
    "mixtral-medium": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                           num_local_experts=8, num_experts_per_tok=2, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=32000, dtype="bfloat16"),
    # about 3.4 B parameters (6.8 GB in bf16): larger than a small memory budget
    "mixtral-large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                          num_local_experts=8, num_experts_per_tok=2, num_attention_heads=16,
                          num_key_value_heads=4, vocab_size=32000, dtype="bfloat16"),
}  # fmt: skip

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS] {{ message['content'] }} [/SYS]"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
SHARD_BYTES = 2 * 1024**3


def make_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE: specials, the 256 byte symbols, then letter groups up to vocab_size so that
    every id the model can produce decodes to something readable."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<unk>", "<s>", "</s>", *byte_symbols]
    letters = string.ascii_lowercase
    for n in itertools.count(2):
        for word in itertools.product(letters, repeat=n):
            for prefix in ("Ġ", ""):
                if len(vocab) >= vocab_size:
                    break
                vocab.append(prefix + "".join(word))
        if len(vocab) >= vocab_size:
            break
    ids = {token: i for i, token in enumerate(vocab[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def mixtral_config(preset: dict) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **preset,
    }


def layer_tensors(cfg: dict, layer: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    D, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    hd = D // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    p = f"model.layers.{layer}."
    shapes = {
        p + "self_attn.q_proj.weight": (D, D),
        p + "self_attn.k_proj.weight": (kv, D),
        p + "self_attn.v_proj.weight": (kv, D),
        p + "self_attn.o_proj.weight": (D, D),
        p + "block_sparse_moe.gate.weight": (E, D),
    }
    for e in range(E):
        q = f"{p}block_sparse_moe.experts.{e}."
        shapes |= {q + "w1.weight": (I, D), q + "w3.weight": (I, D), q + "w2.weight": (D, I)}
    tensors = {name: random_matrix(shape, gen) for name, shape in shapes.items()}
    tensors[p + "input_layernorm.weight"] = torch.ones(D)
    tensors[p + "post_attention_layernorm.weight"] = torch.ones(D)
    return tensors


def random_matrix(shape, gen) -> torch.Tensor:
    # scaled by fan-in so activations keep their size through the layers
    return torch.randn(shape, generator=gen) * shape[-1] ** -0.5


WRITTEN = re.compile(
    r"config\.json|generation_config\.json|tokenizer(_config)?\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
)


def check_replaceable(out_dir: Path):
    """Only a directory of nothing but the files make_checkpoint writes is replaced: anything
    else there may be the user's."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise MoelocalError(f"{out_dir} is not a directory of a synthetic checkpoint")
    if out_dir.is_dir():
        if foreign := foreign_files(out_dir, WRITTEN.fullmatch):
            names = ", ".join(foreign[:3])
            raise MoelocalError(f"{out_dir} holds files a synthetic checkpoint does not "
                                f"({names}); choose another directory")  # fmt: skip


def make_checkpoint(
    out_dir: Path, preset: str = "small", seed: int = 0, replace: bool = True, **shape
) -> Path:
    """Write a random Mixtral-shaped checkpoint, tokenizer and chat template; returns out_dir.
    `shape` overrides the preset's config fields (hidden_size=..., num_local_experts=...)."""
    out_dir = Path(out_dir)
    if replace:
        check_replaceable(out_dir)
    cfg = mixtral_config(PRESETS[preset] | shape)
    dtype = getattr(torch, cfg["dtype"])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)

    def all_tensors():
        D, V = cfg["hidden_size"], cfg["vocab_size"]
        yield {"model.embed_tokens.weight": torch.randn((V, D), generator=gen)}
        for layer in range(cfg["num_hidden_layers"]):
            yield layer_tensors(cfg, layer, gen)
        yield {"model.norm.weight": torch.ones(D), "lm_head.weight": random_matrix((V, D), gen)}

    weight_map, shard, shards = {}, {}, []  # shards: the tensor names of each written file

    def flush():
        shards.append(list(shard))
        save_file(shard, tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        shard.clear()

    for group in all_tensors():
        shard |= {name: t.to(dtype).contiguous() for name, t in group.items()}
        if sum(t.nbytes for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    n = len(shards)
    if n == 1:
        (tmp / "part-1.safetensors").rename(tmp / "model.safetensors")
    else:
        for i, names in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (tmp / f"part-{i}.safetensors").rename(tmp / final)
            weight_map |= {name: final for name in names}
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    make_tokenizer(cfg["vocab_size"]).save(str(tmp / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}  # fmt: skip
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if out_dir.exists():
        if not replace:  # another process made it meanwhile: same preset, same seed, same bytes
            shutil.rmtree(tmp)
            return out_dir
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
