"""Quantized formats (int8, int4 on the CPU): matmuls, every architecture, offloading, accuracy."""

import pytest
import torch
from tiny import ARCHS, VOCAB
from typer.testing import CliRunner

import moelocal
from moelocal.cli import app
from moelocal.quant import MatrixFormat, matmul, quantize

MODES = ["int8", "int4", "nf4"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "N, K, M", [(96, 64, 1), (6, 24, 3), (40, 48, 5), (256, 512, 2), (200, 96, 2)]
)
def test_matmul_matches_the_float_product(mode, N, K, M):
    """Odd shapes are padded for the kernels; the result is the product within the format's
    rounding: int8 per channel ~0.5%, int4 in groups of 32 ~10% of the output's scale."""
    gen = torch.Generator().manual_seed(N + K)
    w, x = torch.randn(N, K, generator=gen), torch.randn(M, K, generator=gen)
    fmt = MatrixFormat(mode, N, K, torch.float32)
    y = matmul(x, quantize(w, fmt), fmt)
    ref = x @ w.t()
    assert y.shape == (M, N) and y.dtype == x.dtype
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if mode == "int8" else 0.15), rel
    seg_bytes = sum(t.numel() * t.element_size() for t in quantize(w, fmt).values())
    assert seg_bytes == fmt.nbytes < N * K * 4


def test_int4_fit_lowers_the_error_of_every_group():
    """The least-squares steps never make a group worse than its plain range fit, and on normal
    weights lower the squared error by ~12% (measured: 0.0061 -> 0.0054 of the weights' power)."""
    from moelocal.quant import fit_int4

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 32, 32, generator=gen)
    w[0, 0] = 0.0  # a group of zeros (padding), a constant one and a two-valued one stay exact
    w[0, 1] = 0.7
    w[0, 2] = torch.tensor([-1.0, 2.0]).repeat(16)

    def error(steps):
        q, scale, lo = fit_int4(w, steps)
        assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round()) and (scale > 0).all()
        return (w - (lo[..., None] + scale[..., None] * q)).pow(2).sum(-1)

    plain, fitted = error(0), error(2)
    assert (fitted <= plain + 1e-6).all()
    assert fitted[0, :3].max() < 1e-10
    assert fitted.sum() < 0.92 * plain.sum()


def test_int4_is_refused_on_cuda_with_the_alternatives():
    from moelocal.errors import MoelocalError
    from moelocal.quant import check_mode

    assert check_mode("int8", torch.device("cuda")) == "int8"
    with pytest.raises(MoelocalError, match="int4 runs on the CPU.*nf4 or int8"):
        check_mode("int4", torch.device("cuda"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N, K", [(128, 96), (192, 40), (4160, 64)])
def test_many_rows_dequantize_then_gemm(mode, N, K):
    """A prefill's many rows take the bf16 GEMM on weights dequantized slice by slice: the same
    product as the kernels' row loop, within bf16 rounding of the dequantized weights."""
    from moelocal.quant import DENSE_ROWS, int4_unpacks

    assert int4_unpacks()  # this torch packs int4 as moelocal unpacks it
    gen = torch.Generator().manual_seed(N)
    w, x = torch.randn(N, K, generator=gen), torch.randn(DENSE_ROWS[mode] + 5, K, generator=gen)
    fmt = MatrixFormat(mode, N, K, torch.bfloat16)
    seg = quantize(w, fmt)
    dense = matmul(x.bfloat16(), seg, fmt)
    rows = torch.cat([matmul(x[i : i + 8].bfloat16(), seg, fmt) for i in range(0, len(x), 8)])
    assert dense.shape == rows.shape == (len(x), N)
    assert ((dense - rows).float().norm() / rows.float().norm()).item() < 0.01


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_projection_gives_the_same_rows(mode, bias):
    """Quantized attention multiplies q, k and v in one call; every row is quantized on its own,
    so q, k and v come out as the three separate projections would give them."""
    from moelocal.config import ModelConfig
    from moelocal.models.common import Attention
    from moelocal.quant import quantize_linears

    cfg = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=64, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-5,
                      qkv_bias=bias)  # fmt: skip
    torch.manual_seed(0)
    separate = Attention(cfg, 0).to(torch.bfloat16)
    fused = Attention(cfg, 0).to(torch.bfloat16)
    fused.load_state_dict(separate.state_dict())
    fused.fuse_qkv()
    for m in (separate, fused):
        quantize_linears(m, mode)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    q, k, v = fused.qkv_proj(x).split(fused.qkv_sizes, dim=-1)
    for a, b in ((q, separate.q_proj(x)), (k, separate.k_proj(x)), (v, separate.v_proj(x))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_generates_and_streams_identically(tiny, arch, mode):
    path = tiny(arch)[0]
    ids = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = moelocal.load(path, device="cpu", quant=mode)
    assert engine.plan.quant == mode
    logits = engine.logits(ids)
    assert torch.isfinite(logits).all()
    out = engine.generate(ids, max_new_tokens=8)
    assert len(out.token_ids) == 8 or out.finish_reason == "stop"
    # the offloading invariant holds for quantized experts too
    streamed = moelocal.load(path, device="cpu", quant=mode, cache_experts=1, cache_policy="lfu")
    assert torch.equal(streamed.logits(ids), logits)
    assert streamed.generate(ids, max_new_tokens=8).token_ids == out.token_ids


def test_quantized_experts_are_smaller(tiny):
    path = tiny("mixtral")[0]
    sizes = {m: moelocal.engine.plan(path, device="cpu", quant=m) for m in ["none", *MODES]}
    assert sizes["int4"].expert_bytes < sizes["int8"].expert_bytes < sizes["none"].expert_bytes
    assert sizes["int8"].resident["attention"] < sizes["none"].resident["attention"]
    assert sizes["int8"].resident["routers"] == sizes["none"].resident["routers"]  # not quantized


# Measured on the embedded default model (random bf16 weights, 300 positions) against a float32
# reference: bf16 KL 0.0018 / top-1 0.96, int8 0.0027 / 0.94, int4 0.025 / 0.63, nf4 0.034 / 0.59.
# The bounds leave room for other CPUs' kernels, and a broken scale or layout gives KL > 1.
BOUNDS = {"int8": (0.01, 0.85), "int4": (0.08, 0.5), "nf4": (0.1, 0.45)}


@pytest.mark.parametrize("mode", MODES)
def test_accuracy_against_float32(mode):
    ids = torch.randint(3, 2048, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = moelocal.load(device="cpu", dtype="float32").logits(ids)
    logits = moelocal.load(device="cpu", quant=mode).logits(ids)
    p, q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    max_kl, min_top1 = BOUNDS[mode]
    assert kl <= max_kl and top1 >= min_top1, (kl, top1)


def test_quant_option_on_the_cli():
    ok = CliRunner().invoke(app, ["generate", "-p", "hi", "-n", "3", "--quant", "int4", "--json"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["generate", "-p", "hi", "--quant", "q3"])
    assert bad.exit_code == 1 and "--quant 'q3'" in bad.stderr
