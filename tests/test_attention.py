"""The CPU kernels' fixed-order attention and router product: as accurate as PyTorch's, the same
bits on every instruction-set path, and each query row (or token) independent of the others."""

import pytest
import torch
import torch.nn.functional as F

from moelocal import cpu_kernels
from moelocal.models.attention import attention_mask, attention_with_sinks
from moelocal.quant import float_linear_any_rows

# (batch, heads, KV heads, queries, keys, key dim, value dim, window): grouped and not, queries
# continuing a cache, head sizes that are not whole vectors, DeepSeek's 192/128, a window
SHAPES = [
    (1, 8, 2, 40, 40, 64, 64, None),
    (2, 4, 4, 1, 37, 16, 16, None),
    (1, 8, 2, 30, 50, 72, 40, None),
    (1, 4, 1, 20, 60, 24, 24, 8),
    (1, 2, 2, 9, 9, 192, 128, None),
]


def paths() -> list[int]:
    return list(range(cpu_kernels.extension().best_isa() + 1))


def inputs(B, H, KV, T, S, dk, dv, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dk, generator=gen) * scale
    k = torch.randn(B, KV, S, dk, generator=gen) * scale
    v = torch.randn(B, KV, S, dv, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_is_as_accurate_as_pytorchs_and_the_same_on_every_path(shape, dtype, with_sinks):
    B, H, KV, T, S, dk, dv, window = shape
    q, k, v = inputs(B, H, KV, T, S, dk, dv, dtype)
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(1)) if with_sinks else None
    mask, scale = attention_mask(S - T, T, window, "cpu"), 0.7 / dk**0.5
    q64, k64, v64 = (t.double() for t in (q, k, v))
    if sinks is not None:  # its reference in float64: the sink's logit joins each softmax
        scores = (q64 @ k64.repeat_interleave(H // KV, 1).transpose(-1, -2)) * scale
        if mask is not None:  # None: a lone query sees every key
            scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.cat((scores, sinks.double().view(1, H, 1, 1).expand(B, H, T, 1)), dim=-1)
        exact = scores.softmax(-1)[..., :-1] @ v64.repeat_interleave(H // KV, 1)
    else:
        exact = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, scale=scale,
                                               enable_gqa=True)  # fmt: skip
    theirs = None  # PyTorch's own, in dtype
    if sinks is None:
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                enable_gqa=True)  # fmt: skip
    elif dk == dv:
        theirs = attention_with_sinks(q, k, v, mask, sinks, scale)
    outs = [cpu_kernels.extension().attention(q, k, v, scale, window or 0, sinks, isa)
            for isa in paths()]  # fmt: skip
    for out in outs:
        assert out.dtype == dtype and out.shape == (B, H, T, dv)
        assert torch.equal(out, outs[0])
    ours = (outs[0].double() - exact).abs().max().item()
    if theirs is not None:
        assert ours <= 1.5 * (theirs.double() - exact).abs().max().item() + 1e-6
    assert ours <= (2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_rows_attention_depends_on_nothing_else(shape, dtype):
    """Each query row gets the same bits alone over the keys it sees (a decode step), in a chunk
    of the prompt (a continued prompt cache), in another batch row, and on any thread count."""
    B, H, KV, T, S, dk, dv, window = shape
    q, k, v = inputs(B, H, KV, T, S, dk, dv, dtype, seed=2)
    full = cpu_kernels.attention(q, k, v, 0.3, window, None)
    for t in range(T):
        seen = S - T + t + 1
        alone = cpu_kernels.attention(q[-1:, :, t : t + 1], k[-1:, :, :seen], v[-1:, :, :seen],
                                      0.3, window, None)  # fmt: skip
        assert torch.equal(alone, full[-1:, :, t : t + 1]), t
    if T > 3:
        tail = cpu_kernels.attention(q[:, :, 3:], k, v, 0.3, window, None)
        assert torch.equal(tail, full[:, :, 3:])
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert torch.equal(cpu_kernels.attention(q, k, v, 0.3, window, None), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("N, K", [(8, 64), (8, 4096), (60, 2056), (256, 7168)])
def test_router_logits_are_a_tokens_own_at_any_row_count(N, K):
    """BLAS rounds a row differently with 1, 17 or 600 rows beside it (measured here on float32
    routers of 8-256 experts); the router product gives a token the same bits in any of them."""
    gen = torch.Generator().manual_seed(K)
    w, x = torch.randn(N, K, generator=gen), torch.randn(600, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    together = float_linear_any_rows(x, w, bias)
    assert together.dtype == torch.float32 and together.shape == (600, N)
    for rows in (slice(0, 1), slice(599, 600), slice(100, 117), slice(3, 303)):
        assert torch.equal(float_linear_any_rows(x[rows], w, bias), together[rows])
    exact = x.double() @ w.double().t() + bias.double()
    assert ((together.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
