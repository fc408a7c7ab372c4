"""Tiny random checkpoints in real Hugging Face layout, written by transformers (the reference)."""

import json
import shutil
from pathlib import Path

import torch
import transformers

from moelocal.synthetic import CHAT_TEMPLATE, make_tokenizer

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)  # fmt: skip

ARCHS = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_key_value_heads=2, num_local_experts=6,
             num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=32, shared_expert_intermediate_size=40,
             num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
             norm_topk_prob=False),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=32, head_dim=24, num_key_value_heads=2,
             num_experts=6, num_experts_per_tok=3, norm_topk_prob=True),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=32, num_key_value_heads=4, num_experts=6, num_experts_per_tok=2,
             clip_qkv=2.5),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=24, q_lora_rank=None, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
             topk_method="group_limited_greedy", n_group=4, topk_group=2,
             routed_scaling_factor=1.5),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=24, q_lora_rank=24, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4,
             topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(intermediate_size=32, head_dim=16, num_key_value_heads=2, num_local_experts=6,
             num_experts_per_tok=2, sliding_window=5),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=24, head_dim=16, num_key_value_heads=2,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=1.8,
             attention_bias=True, use_qk_norm=True),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
             head_dim=16, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
             linear_value_head_dim=8, linear_conv_kernel_dim=4, num_hidden_layers=4,
             layer_types=["linear_attention", "full_attention", "linear_attention",
                          "linear_attention"], mlp_only_layers=[2]),
    ),
    "qwen3_5_moe": (  # an image-text model: its text model nested, a vision tower beside
        "Qwen3_5MoeConfig",
        "Qwen3_5MoeForConditionalGeneration",
        dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, head_dim=16,
             num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, linear_num_key_heads=2,
             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
             num_hidden_layers=4, vision_config=dict(depth=1, hidden_size=32, num_heads=2,
                                                     intermediate_size=32, out_hidden_size=64)),
    ),
    "qwen3_5_moe_text": (  # its text model saved on its own
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, head_dim=16,
             num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, linear_num_key_heads=2,
             linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=16,
             num_hidden_layers=3, layer_types=["linear_attention", "full_attention",
                                               "linear_attention"]),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=24, num_key_value_heads=2, num_local_experts=6,
             num_experts_per_tok=2, embedding_multiplier=3.0, attention_multiplier=0.15,
             residual_multiplier=0.6, logits_scaling=2.5),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(intermediate_size=24, num_key_value_heads=2, num_local_experts=6,
             num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
             router_jitter_noise=0.3),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(intermediate_size=80, moe_intermediate_size=24, num_key_value_heads=2,
             moe_num_experts=6, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
             use_bias=True, tie_word_embeddings=False),
    ),
    "minimax_m2": (
        "MiniMaxM2Config",
        "MiniMaxM2ForCausalLM",
        dict(intermediate_size=24, head_dim=16, num_key_value_heads=2, num_local_experts=6,
             num_experts_per_tok=2, rotary_dim=8),
    ),
}  # fmt: skip


def randomize(model: torch.nn.Module, seed: int, scale: float = 3.0):
    """Random weights scaled up so that logits are not flat and greedy choices are stable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if name.endswith("sinks"):  # logits of their own: as large as attention's
                t.copy_(2.0 * torch.randn(t.shape, generator=gen))
            elif t.dim() == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                t.copy_(base + 0.1 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * scale * t.shape[-1] ** -0.5)


def hf_model(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls, kwargs = ARCHS[arch]
    kwargs = COMMON | kwargs | overrides
    if arch.startswith("deepseek"):  # latent attention has no grouped KV heads
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    if "vision_config" in kwargs:  # the text model's config nested in the image-text one
        vision = kwargs.pop("vision_config")
        config = getattr(transformers, config_cls)(text_config=kwargs, vision_config=vision)
    else:
        config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    return model


def save_tiny(path: Path, arch: str, seed: int = 0, max_shard_size=None, **overrides):
    """Save a tiny random model of `arch`, a tokenizer and chat template; returns the HF model."""
    model = hf_model(arch, seed, **overrides)
    shutil.rmtree(path, ignore_errors=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    make_tokenizer(model.config.get_text_config().vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
    )
    return model


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])  # fmt: skip


def to_mxfp4(w: torch.Tensor):
    """(E, N, K) float -> MXFP4 blocks (E, N, K/32, 16) uint8 (two e2m1 codes a byte, the low
    nibble first) and e8m0 scales (E, N, K/32): each block of 32 scaled by a power of two that
    puts its largest magnitude within 6, then rounded to the nearest e2m1 value."""
    E, N, K = w.shape
    b = w.float().reshape(E, N, K // 32, 32)
    exp = torch.ceil(torch.log2(b.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 6.0))
    codes = ((b / torch.exp2(exp))[..., None] - FP4_VALUES).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp[..., 0] + 127).to(torch.uint8)


def save_mxfp4(path: Path, arch: str = "gpt_oss", seed: int = 0, **overrides):
    """A tiny gpt-oss as OpenAI publishes them: experts in MXFP4 (*_blocks, *_scales, stored
    (E, out, in / 32, 16) where the bf16 experts are (E, in, out)), the rest as it was."""
    from safetensors.torch import load_file, save_file

    save_tiny(path, arch, seed, **overrides)
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))]:
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = to_mxfp4(tensors.pop(key).mT)
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (path / "config.json").write_text(json.dumps(config))


def to_fp8(w: torch.Tensor, block: tuple[int, int]):
    """(N, K) float -> float8_e4m3fn weights and float32 scales, one per block (partial at the
    ends), as DeepSeek-V3 is published (`weight_scale_inv`); and the weights they stand for."""
    (N, K), (bm, bn) = w.shape, block
    Np, Kp = -(-N // bm) * bm, -(-K // bn) * bn
    blocks = torch.nn.functional.pad(w.float(), (0, Kp - K, 0, Np - N))
    blocks = blocks.view(Np // bm, bm, Kp // bn, bn)
    scale = (blocks.abs().amax(dim=(1, 3), keepdim=True) / 448.0).clamp(min=1e-12)
    q = (blocks / scale).to(torch.float8_e4m3fn)
    stands_for = (q.float() * scale).view(Np, Kp)[:N, :K].contiguous()
    return q.view(Np, Kp)[:N, :K].contiguous(), scale.view(Np // bm, Kp // bn), stands_for


def save_fp8(path: Path, stands_for: Path, arch: str = "deepseek_v3", block=(16, 16)):
    """A tiny model as DeepSeek publishes V3, at `path`: every Linear weight of the decoder
    layers but the routers in FP8 with block scales; at `stands_for`, the same model with the
    weights they stand for (the reference's checkpoint)."""
    from safetensors.torch import load_file, save_file

    save_tiny(path, arch)
    shutil.copytree(path, stands_for)
    tensors = load_file(path / "model.safetensors")
    plain = dict(tensors)
    for key in [k for k in tensors if k.startswith("model.layers.") and k.endswith(".weight")
                and tensors[k].dim() == 2 and ".mlp.gate." not in k]:  # fmt: skip
        q, scale, plain[key] = to_fp8(tensors[key], block)
        tensors[key], tensors[key.replace(".weight", ".weight_scale_inv")] = q, scale
    save_file(tensors, path / "model.safetensors")
    save_file(plain, stands_for / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))


def reference(path: Path):
    # transformers' default attention (sdpa), as a user of transformers would run it
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def streaming_plan(path: Path, **options):
    """The plan of a CPU budget that holds half the experts (at a budget's default context, or
    options' context): its fixed_bytes are what any streaming budget holds besides the slots
    (the embedding table on disk, a prefill pass's room, the prefetcher's rows)."""
    import moelocal

    full = moelocal.engine.plan(path, device="cpu", cpu_mem="1GiB", **options)
    assert full.device_slots == full.n_experts and not full.on_disk
    budget = full.fixed_bytes + full.cache_bytes // 2
    plan = moelocal.engine.plan(path, device="cpu", cpu_mem=budget, **options)
    assert plan.device_slots < plan.n_experts
    return plan
