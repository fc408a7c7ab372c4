"""Each architecture against transformers, the reference: logits at each position; greedy tokens."""

import pytest
import torch
from tiny import ARCHS, VOCAB

import moelocal
from moelocal.convert import convert
from moelocal.models.attention import KVCache

# Logits of 10-25 in magnitude, through layers of x3-scaled random weights that amplify float32
# rounding: summing in another order (moelocal's fixed-order attention and router products, not
# transformers' SDPA and BLAS calls) moved the largest difference to 0.8e-5..2.3e-4 over 4 seeds
# of each architecture (2.1e-4 before them); a wrong formula moves it by 1e-2 and more.
TOLERANCE = 3e-4


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()


def reference_greedy(ref, ids, n):
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def assert_matches_transformers(path, ref, n_prompt=24, n_new=16, **load):
    engine = moelocal.load(path, device="cpu", **load)
    ids = prompt(n_prompt)
    ours = engine.logits(ids)
    theirs = reference_logits(ref, ids)
    assert ours.dtype == torch.float32 and ours.shape == (n_prompt, ref.config.vocab_size)
    assert theirs.std() > 1.0  # not flat: greedy choices are meaningful
    assert (ours - theirs).abs().max().item() <= TOLERANCE
    assert engine.generate(ids, max_new_tokens=n_new).token_ids == reference_greedy(ref, ids, n_new)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_matches_transformers(tiny, arch):
    assert_matches_transformers(*tiny(arch))


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("mixtral", {"sliding_window": 7}),
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}),
        ("qwen3_moe", {"tie_word_embeddings": True, "decoder_sparse_step": 2}),
        ("olmoe", {"norm_topk_prob": True, "clip_qkv": None}),
        ("deepseek_v2", {"q_lora_rank": 16, "topk_method": "greedy", "n_group": None}),
        ("deepseek_v3", {"rope_interleave": False, "n_shared_experts": 2}),
        (
            "deepseek_v3",
            {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                              "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
                              "beta_slow": 1}},
        ),
        ("mixtral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0}),
        ("glm4_moe", {"use_qk_norm": False, "attention_bias": False, "n_group": 1,
                      "topk_group": 1, "first_k_dense_replace": 0, "n_shared_experts": 2,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                          "partial_rotary_factor": 0.25}}),
        ("qwen3_next", {"layer_types": None, "full_attention_interval": 2, "mlp_only_layers": [],
                        "linear_num_value_heads": 2, "attention_bias": True,
                        "decoder_sparse_step": 2}),
        ("phimoe", {"sliding_window": 6, "router_jitter_noise": 0.01, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [1.5 + 0.2 * i for i in range(8)], "short_mscale": 1.1,
            "long_mscale": 1.3}}),
        ("ernie4_5_moe", {"use_bias": False, "tie_word_embeddings": True,
                          "moe_layer_start_index": 0, "moe_layer_interval": 2,
                          "moe_num_shared_experts": 0}),
        ("gpt_oss", {"swiglu_limit": 2.0, "swiglu_alpha": 1.0, "sliding_window": 3,
                     "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
        ("gpt_oss", {"attention_bias": False, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "beta_fast": 16.0,
            "beta_slow": 2.0, "truncate": True, "original_max_position_embeddings": 32}}),
    ],
)  # fmt: skip
def test_architecture_variants(tiny, arch, overrides):
    assert_matches_transformers(*tiny(arch, seed=1, **overrides))


def assert_stored_quantized_runs_alike(path, packed_dir, default_quant: str):
    """A checkpoint stored quantized: the same logits streamed from disk as resident, and by
    default in default_quant, on load or converted (then the same logits)."""
    ids = prompt(16)
    resident = moelocal.load(path, device="cpu", quant="none")
    streamed = moelocal.load(path, device="cpu", quant="none", cache_experts=1)
    assert torch.equal(streamed.logits(ids), resident.logits(ids))
    on_load = moelocal.load(path, device="cpu")
    assert on_load.plan.quant == default_quant
    packed = moelocal.load(convert(str(path), None, packed_dir), device="cpu")
    assert packed.plan.quant == default_quant
    assert torch.equal(packed.logits(ids), on_load.logits(ids))


@pytest.mark.parametrize("overrides", [{}, {"swiglu_limit": 1.5, "num_experts_per_tok": 3}])
def test_mxfp4_experts_as_published_match_transformers_reading_them(tmp_path, overrides):
    """gpt-oss's experts in MXFP4, read by transformers (which dequantizes them on the CPU) and
    by moelocal with --quant none: the same model, resident or streamed from disk; by default
    moelocal runs them in int4."""
    import transformers
    from tiny import save_mxfp4

    save_mxfp4(tmp_path, "gpt_oss", seed=2, **overrides)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).eval()
    assert_matches_transformers(tmp_path, ref, quant="none")
    assert_stored_quantized_runs_alike(tmp_path, tmp_path / "packed", "int4")


@pytest.mark.parametrize("block", [(16, 16), (8, 32)])
def test_fp8_weights_as_published_match_the_weights_they_stand_for(tmp_path, block):
    """DeepSeek-V3 as published: Linear weights in FP8 e4m3 with a float32 scale per block,
    blocks partial where a dimension does not divide (kv_a_proj_with_mqa: 24 rows here, 576 in
    V3); with --quant none, the model of the weights they stand for, resident or streamed from
    disk. By default moelocal runs them in int8."""
    from tiny import reference, save_fp8

    path = tmp_path / "fp8"
    save_fp8(path, tmp_path / "stands-for", "deepseek_v3", block)
    assert_matches_transformers(path, reference(tmp_path / "stands-for"), quant="none")
    assert_stored_quantized_runs_alike(path, tmp_path / "packed", "int8")


def test_linear_attention_over_many_blocks_and_continued(tiny):
    """Gated DeltaNet over a prompt of several of its blocks (64 tokens), and a prompt continued
    on its recurrent state (chat's prompt cache), as transformers computes them."""
    path, ref = tiny("qwen3_next", seed=3, max_position_embeddings=512)
    assert_matches_transformers(path, ref, n_prompt=150, n_new=8)
    engine = moelocal.load(path, device="cpu")
    ids = prompt(150, seed=4)
    whole = engine.logits(ids)
    cache = KVCache(engine.config.num_hidden_layers, len(ids))
    with torch.inference_mode():
        parts = [engine.model(torch.tensor([part]), cache)[0] for part in (ids[:70], ids[70:71],
                                                                           ids[71:])]  # fmt: skip
    # the blocks fall elsewhere: float32 sums in another order, through the recurrent state
    assert (torch.cat(parts) - whole).abs().max().item() <= 10 * TOLERANCE
    assert cache.rewind(150) == 150 and cache.rewind(100) == 0  # a state cannot be cut


def test_an_image_text_models_vision_tower_is_skipped_with_a_notice(tiny, capsys):
    path = tiny("qwen3_5_moe")[0]
    capsys.readouterr()
    engine = moelocal.load(path, device="cpu")
    assert engine.config.linear_layers == [True, True, True, False]
    err = capsys.readouterr().err
    assert err.count("vision tower is skipped") == 1


def test_configs_as_released_name_the_rotary_share_their_own_way():
    """MiniMax-M2's config.json gives `rotary_dim`, older GLM ones `partial_rotary_factor` beside
    the RoPE parameters rather than in them."""
    from moelocal.models import FAMILIES
    from moelocal.models.family import rotary_dim

    base = dict(vocab_size=100, hidden_size=256, num_hidden_layers=2, num_attention_heads=2,
                head_dim=128, intermediate_size=64, rope_theta=1e4)  # fmt: skip
    minimax = FAMILIES["minimax_m2"].read_config(base | {"model_type": "minimax_m2",
                                                         "rotary_dim": 64})  # fmt: skip
    glm = FAMILIES["glm4_moe"].read_config(base | {"model_type": "glm4_moe",
                                                   "partial_rotary_factor": 0.25})  # fmt: skip
    assert (rotary_dim(minimax), rotary_dim(glm)) == (64, 32)


def test_resident_float_weights_lie_on_64_byte_boundaries_wherever_the_file_put_them(tiny):
    """On some CPUs MKL's float sums change with where a matrix lies (AMD EPYC: 8 bytes off), so
    the same weights at other file offsets (sharded, converted) gave other logits."""
    from moelocal.store import tensor_offsets

    path = tiny("mixtral")[0]
    offsets = [at[0] for at in tensor_offsets(path / "model.safetensors").values()]
    assert any(offset % 64 for offset in offsets)  # the file puts some tensors off a boundary
    engine = moelocal.load(path, device="cpu")
    weights = [t for t in engine.model.state_dict().values() if t.is_floating_point()]
    assert weights and all(t.data_ptr() % 64 == 0 for t in weights)


def test_sharded_checkpoint_loads_the_same(tmp_path, tiny):
    from tiny import save_tiny

    path, _ = tiny("qwen2_moe")
    save_tiny(tmp_path / "sharded", "qwen2_moe", seed=0, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ids = prompt(12)
    single = moelocal.load(path, device="cpu").logits(ids)
    sharded = moelocal.load(tmp_path / "sharded", device="cpu").logits(ids)
    assert torch.equal(single, sharded)


def test_experts_stacked_on_disk_load_the_same(tmp_path, tiny):
    """Experts saved stacked, gate_up_proj (E, 2I, D) and down_proj (E, D, I) per layer, as
    transformers 5 holds them in memory: the same model, resident or streamed."""
    from safetensors.torch import load_file, save_file

    path = tiny("qwen3_moe")[0]
    tensors = load_file(path / "model.safetensors")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (stacked / f.name).write_bytes(f.read_bytes())
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts"

        def take(e, name, p=p):
            return tensors.pop(f"{p}.{e}.{name}.weight")

        tensors[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([take(e, "gate_proj"), take(e, "up_proj")]) for e in range(6)]
        )
        tensors[f"{p}.down_proj"] = torch.stack([take(e, "down_proj") for e in range(6)])
    save_file(tensors, stacked / "model.safetensors")
    ids = prompt(12)
    reference = moelocal.load(path, device="cpu").logits(ids)
    for budget in (None, 1):
        logits = moelocal.load(stacked, device="cpu", cache_experts=budget).logits(ids)
        assert torch.equal(logits, reference)


def test_seeded_sampling_repeats(tiny):
    engine = moelocal.load(tiny("mixtral")[0], device="cpu")
    ids = prompt(8)
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95)
    first = engine.generate(ids, seed=7, **kw).token_ids
    assert engine.generate(ids, seed=7, **kw).token_ids == first
    others = {tuple(engine.generate(ids, seed=s, **kw).token_ids) for s in range(8, 12)}
    assert others != {tuple(first)}  # the seed matters


def test_kv_cache_decode_equals_full_forward(tiny):
    """Logits of a one-token-at-a-time decode equal those of one pass over the whole sequence."""
    engine = moelocal.load(tiny("deepseek_v3")[0], device="cpu")
    ids = prompt(10)
    full = engine.logits(ids)
    cache = KVCache(engine.config.num_hidden_layers, len(ids))
    with torch.inference_mode():
        steps = [engine.model(torch.tensor([[t]]), cache)[0, -1] for t in ids]
    assert (torch.stack(steps) - full).abs().max().item() <= TOLERANCE


def test_bfloat16_load(tiny):
    path, _ = tiny("mixtral")
    engine = moelocal.load(path, device="cpu", dtype="bfloat16")
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    out = engine.generate(prompt(6), max_new_tokens=5)
    assert len(out.token_ids) == 5
