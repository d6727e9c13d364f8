"""The n-gram cache of `memory` and `adapt` modes (models/ngram.py): exact counts below each
token's limit, with and without X's index, and a mixture that is a distribution over the vocabulary."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.ngram import NGramIndex, max_order, ngram_counts, ngram_mixture, token_bits


def brute_counts(seq: list[int], i: int, k: int, limit: int) -> tuple[int, int]:
    """(how often the k tokens before i were followed by seq[i], and by anything) at positions
    below `limit`."""
    if i < k:
        return 0, 0
    context = seq[i - k : i]
    followed = [j for j in range(k, limit) if seq[j - k : j] == context]
    return sum(seq[j] == seq[i] for j in followed), len(followed)


@pytest.mark.parametrize("with_index", [False, True])
def test_counts_are_exact_below_each_limit(with_index: bool) -> None:
    rng = random.Random(1)
    for _ in range(60):  # three token values and a large one: every context recurs
        seq = [rng.choice([3, 4, 5, 49151]) for _ in range(rng.randrange(1, 90))]
        first = rng.randrange(0, len(seq) + 1)
        limits = np.array([rng.randrange(0, i + 1) for i in range(first, len(seq))], dtype=np.int64)
        arr = np.array(seq)
        earlier = NGramIndex.build(arr[:first], 3, 16) if with_index else None
        c, n, index = ngram_counts(arr, first, limits, 3, 16, earlier)
        assert c.shape == n.shape == (4, len(seq) - first)
        for i in range(first, len(seq)):
            for k in range(4):
                got = (int(c[k, i - first]), int(n[k, i - first]))
                assert got == brute_counts(seq, i, k, int(limits[i - first])), (seq, first, i, k)
        assert index.size == len(seq)


def test_keys_are_exact_up_to_64_bits() -> None:
    assert token_bits(49152) == 16 and max_order(49152) == 3  # SmolLM2
    assert token_bits(262144) == 18 and max_order(262144) == 2  # Gemma 3
    a, b = 49151, 49150  # keys that differ in their last bit only
    c, n, _ = ngram_counts(np.array([a, a, a, a, b, a, a, a, a]), 0, np.arange(9), 3, 16)
    assert [int(v) for v in c[3]] == [0, 0, 0, 0, 0, 0, 0, 0, 1]  # a a a → a at 3 and 8; a a a → b at 4
    assert [int(v) for v in n[3]] == [0, 0, 0, 0, 1, 0, 0, 0, 2]


def test_the_mixture_is_a_distribution_over_the_vocabulary() -> None:
    vocab, rng = 11, random.Random(2)
    seq = [rng.randrange(vocab) for _ in range(40)]
    p_lm = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 0)
    params = SimpleNamespace(
        ngram_smoothing=(0.5, 1.0, 2.0, 4.0), ngram_bias=(-2.0, -1.0, 0.0, 1.0), ngram_count=0.3, ngram_max=0.9999
    )
    for first in (0, 20):
        earlier = NGramIndex.build(np.array(seq[:first]), 3, 4) if first else None
        total = 0.0
        for w in range(vocab):  # every token that could come next
            limits = np.arange(first, len(seq) + 1)  # each token sees every one before it
            c, n, _ = ngram_counts(np.array([*seq, w]), first, limits, 3, 4, earlier)
            bits = torch.full((c.shape[1],), 0.0, dtype=torch.float64)
            bits[-1] = -torch.log2(p_lm[w])
            total += float(torch.exp2(-ngram_mixture(bits, c, n, params, vocab)[-1]))
        assert abs(total - 1.0) < 1e-12
