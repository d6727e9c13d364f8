"""An n-gram cache: the successors of every earlier occurrence of a token's last k tokens, counted
exactly, for k = 0..order, and blended into one distribution over the vocabulary (the phrases a
dataset repeats, counted, where the copy model follows one earlier occurrence).

For token t_i and order k, c_k(w) is how often the k tokens before i were followed by w at the
positions before i's window (those the window cannot see, as for the copy model; a token of the
first window has none, so it is coded by the LM alone, as in a sequence short enough for one
window), and n_k = Σ_w c_k(w) how often they occurred there at all. From the uniform distribution up,

    p_{-1}(w) = 1 / V,    p_k(w) = (c_k(w) + β_k p_{k-1}(w)) / (n_k + β_k)    (orders with n_k > 0)

(Dirichlet smoothing, each order backing off to the one below), a proper distribution for any
β_k > 0. It is mixed with what it is added to by ν = ν_max σ(a_top + b ln(1 + n_top)), `top` the
longest order whose context occurred (ν = 0 where nothing was counted). Everything is a function
of the tokens before i, so the code stays sequential and decodable.

Counting: a context of k tokens and its successor are one exact 64-bit key ((k + 1) × the bits of
a token id: order ≤ 3 for a 49,152-token vocabulary); no hash, so the counts are exact and the
blend sums to one. n_k at i counts position i - 1's order-(k - 1) key (the k tokens before i) one
position lower. Each order's positions are sorted by (key, position) once (models/positions.py,
≤ 16 bytes a position an order), so a count below a bound is two binary searches; X's index is kept
with X's memory, and a Y after X sorts only its own positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from models.positions import PositionIndex


class NGramWeights(Protocol):
    """What `ngram_mixture` reads: `NGramParams`, or the fit's parameters as tensors."""

    ngram_smoothing: Sequence[float]
    ngram_bias: Sequence[float]
    ngram_count: float
    ngram_max: float


@dataclass(frozen=True, kw_only=True)
class NGramParams:
    """The n-gram cache's stated parameters, a part of `memory`'s and `adapt`'s (`MemoryParams`,
    `AdaptParams`): no cache while `ngram_smoothing` is empty."""

    ngram_smoothing: tuple[float, ...] = ()  # β_0..β_K
    ngram_bias: tuple[float, ...] = ()  # a_0..a_K
    ngram_count: float = 0.0  # b, the weight of ln(1 + n_top)
    ngram_max: float = 0.9999  # ν_max

    @property
    def ngram_order(self) -> int:
        """K: the cache counts contexts of 0..K tokens (-1: no cache)."""
        return len(self.ngram_smoothing) - 1

    def ngram_description(self) -> dict[str, str]:
        """The cache's entries of a mode's stated parameters (none without a cache)."""
        if not self.ngram_smoothing:
            return {}
        return {
            "ngram": (
                f"the successors of every earlier occurrence of the last k tokens, k = 0..{self.ngram_order}, "
                f"counted (c_k: of the token, n_k: of any) and blended from the uniform distribution up: "
                f"p_k = (c_k + beta_k * p_(k-1)) / (n_k + beta_k) where n_k > 0, beta = {list(self.ngram_smoothing)}"
            ),
            "ngram_weight": (
                f"{self.ngram_max} * sigmoid(a[top] + {self.ngram_count} * ln(1 + n_top)), "
                f"a = {list(self.ngram_bias)}, top: the longest k with n_k > 0"
            ),
        }

    def ngram_key(self) -> str:
        """The cache's part of a mode's cache key ('' without a cache)."""
        if not self.ngram_smoothing:
            return ""
        return f":{self.ngram_smoothing}:{self.ngram_bias}:{self.ngram_count}:{self.ngram_max}"

    def check_ngram(self, vocab: int) -> None:
        """Refuse an order whose keys would not fit 64 bits for this vocabulary (counts must be exact)."""
        if self.ngram_order > max_order(vocab):
            raise ValueError(f"an n-gram cache of order {self.ngram_order} needs keys over 64 bits here")


def token_bits(vocab: int) -> int:
    return max(1, (vocab - 1).bit_length())


def max_order(vocab: int) -> int:
    """The longest context whose keys (context and successor) fit in 64 bits exactly."""
    return 64 // token_bits(vocab) - 1


def keys_of(seq: np.ndarray, k: int, bits: int, low: int) -> np.ndarray:
    """The order-k keys of positions max(low, k).. of seq: the k tokens before and the token, packed."""
    n, low = len(seq), max(low, k)
    s = seq.astype(np.uint64)
    key = np.zeros(max(n - low, 0), dtype=np.uint64)
    for j in range(k, -1, -1):  # t[i-k] first, the token itself last
        key = (key << np.uint64(bits)) | s[low - j : n - j]
    return key


@dataclass(frozen=True)
class NGramIndex:
    """A sequence's positions by their key at each order 0..K (X's, kept with X's memory)."""

    size: int  # the sequence's tokens
    orders: tuple[PositionIndex, ...]  # order k: positions max(low, k).. by their order-k key

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.orders)

    @staticmethod
    def build(seq: np.ndarray, order: int, bits: int, low: int = 0) -> NGramIndex:
        """The index of positions low.. of seq."""
        orders = (PositionIndex.of(keys_of(seq, k, bits, low), max(low, k)) for k in range(order + 1))
        return NGramIndex(len(seq), tuple(orders))


def ngram_counts(
    seq: np.ndarray,
    first: int,
    limits: np.ndarray,
    order: int,
    bits: int,
    earlier: NGramIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor, NGramIndex]:
    """(c, n), each (order + 1, len(seq) - first) int64, and the index of the positions they
    looked at: for each token i = first.. of seq and each order k, how often the k tokens before i
    were followed by t_i (c) and by anything (n) at the positions below limits[i - first] (those
    before i's window, as the copy model sees them; 0 where i has fewer than k tokens before it).
    `earlier` indexes seq[:first] (a Y after X: X's index), so only the positions from `first`
    on are indexed here; without it every position of seq is."""
    n_seq, m = len(seq), len(seq) - first
    limits = np.asarray(limits, dtype=np.int64)
    assert len(limits) == m and (earlier is None or earlier.size == first)
    index = NGramIndex.build(seq, order, bits, first if earlier is not None else 0)

    def count(k: int, keys: np.ndarray, below: np.ndarray) -> np.ndarray:
        got = index.orders[k].count_below(keys, below)
        if earlier is not None:
            got += earlier.orders[k].count_below(keys, np.minimum(below, first))
        return got

    c = np.zeros((order + 1, m), dtype=np.int64)
    n = np.zeros((order + 1, m), dtype=np.int64)
    n[0] = limits  # every position below the limit
    for k in range(order + 1):
        start = max(first, k)  # tokens with k tokens before them
        if start >= n_seq:
            continue
        rows = slice(start - first, m)
        c[k, rows] = count(k, keys_of(seq, k, bits, start), limits[rows])
        if k:  # the k tokens before i are position i - 1's order-(k - 1) key
            n[k, rows] = count(k - 1, keys_of(seq[:-1], k - 1, bits, start - 1), limits[rows] - 1)
    return torch.from_numpy(c), torch.from_numpy(n), index


def ngram_mixture(
    bits: torch.Tensor, c: torch.Tensor, n: torch.Tensor, params: NGramWeights, vocab: int
) -> torch.Tensor:
    """`bits` (n,) float64 mixed with the blended n-gram distribution of the counts (`ngram_counts`)."""
    p = torch.full(bits.shape, 1.0 / vocab, dtype=torch.float64)
    top = torch.zeros(bits.shape, dtype=torch.long)
    top_n = torch.zeros(bits.shape, dtype=torch.float64)
    for k in range(c.shape[0]):
        seen = n[k] > 0
        beta = params.ngram_smoothing[k]
        p = torch.where(seen, (c[k] + beta * p) / (n[k] + beta), p)
        top = torch.where(seen, k, top)
        top_n = torch.where(seen, n[k].to(torch.float64), top_n)
    bias = torch.as_tensor(params.ngram_bias, dtype=torch.float64)
    nu = params.ngram_max * torch.sigmoid(bias[top] + params.ngram_count * torch.log1p(top_n))
    nu = torch.where(n[0] > 0, nu, 0.0)  # nothing counted (the first window): `bits` alone
    return -torch.log2((1 - nu) * torch.exp2(-bits) + nu * p)
