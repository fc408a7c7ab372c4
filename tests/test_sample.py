"""Samplers on hand-built distributions."""

import math

import torch

from moelocal.sample import sample


def counts(logits, n=4000, **kw):
    gen = torch.Generator().manual_seed(0)
    ids = [int(sample(logits, generator=gen, **kw)[0]) for _ in range(n)]
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[-1]).float() / n


def logits_of(probs):
    return torch.tensor([[math.log(p) if p > 0 else -1e9 for p in probs]])


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 0.0]])
    assert sample(logits, temperature=0).tolist() == [1, 0]


def test_sampling_follows_the_distribution():
    freq = counts(logits_of([0.5, 0.3, 0.2]), temperature=1.0)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_top_k_keeps_the_k_most_likely():
    freq = counts(logits_of([0.4, 0.3, 0.2, 0.1]), temperature=1.0, top_k=2)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 4 / 7) < 0.03


def test_top_p_keeps_the_smallest_nucleus():
    # 0.5 + 0.3 reaches 0.75: the nucleus is {0, 1}
    freq = counts(logits_of([0.5, 0.3, 0.15, 0.05]), temperature=1.0, top_p=0.75)
    assert freq[2] == 0 and freq[3] == 0 and freq[1] > 0.3
    # a top_p below the first probability keeps only the most likely token
    assert counts(logits_of([0.5, 0.3, 0.2]), temperature=1.0, top_p=0.1)[0] == 1


def test_low_temperature_sharpens():
    freq = counts(logits_of([0.6, 0.4]), temperature=0.1)
    assert freq[0] > 0.95


def test_same_seed_same_samples():
    logits = torch.randn(1, 50)
    a = [int(sample(logits, 1.0, generator=torch.Generator().manual_seed(3))) for _ in range(5)]
    b = [int(sample(logits, 1.0, generator=torch.Generator().manual_seed(3))) for _ in range(5)]
    assert a == b
