"""`memory` conditioning: the LM's window extended by a nearest-neighbour memory of the tokens
coded before it (kNN-LM, Khandelwal et al., ICLR 2020), so C(Y|X) sees all of a dataset X, not
only the 2,048 tokens before Y.

What the memory holds. A token at position p of start + sequence is scored by the window that
starts at w(p) = 0 for p < context, else ((p - context) // stride + 1) × stride (`WindowPolicy`).
Its memory is every token at a position before w(p): exactly what the window cannot see, X's
tokens and the sequence's own earlier ones alike (repetitions inside X count, as in zstd). Each
memory entry is keyed by the final hidden state that predicted the token (the input of the
vocabulary head) and holds the token.

The code. With the k nearest keys of the state h that predicts token t (squared L2 distances
d_1 <= ... <= d_k, tokens v_1..v_k),

    p_mem(v) = Σ_j softmax_j(-(d_j - d_1) / T) [v_j = v]
    λ = λ_max · σ(a + b · ln(d_1 + ε) + c · ln(1 + r))
    p(t) = (1 - λ) p_LM(t) + λ p_mem(t)

where r counts the tokens right before t whose nearest key named them (a copy in progress: the
run an LZ77 match would extend). A copy model then follows one earlier occurrence, as LZ77 and
PAQ's match model do: if the last `order` tokens occurred before the window, the token that
followed them there (the latest such occurrence) is predicted, and the pointer moves on while it
predicts right; with L the tokens it has matched (counted back from t on a fresh occurrence, then
one more per right prediction),

    μ = μ_max · σ(α + β · ln L)
    p'(t) = (1 - μ) p(t) + μ [t = the predicted token]

It carries a copy across record boundaries, where every record's start looks alike to the
hidden states (a separator) and the nearest keys pick any record. Everything λ, p_mem and μ
depend on is known to a decoder before t (the states, the memory, the earlier tokens and whether
they matched), and every part is a distribution over the vocabulary, so the mixture is a decodable
code; a token with an empty memory (the first window) is coded by the LM alone. Coding is
sequential, so C(X·Y) = C(X) + C(Y|X) and C(X) alone is the X part of C(X·Y).

Exact search. The distances are computed in blocks of a fixed number of keys with the engine's
fixed-tile products on the CPU (`models.invariant`), so a query's neighbours never depend on its
batch; top-k runs on block minima first (the k best keys lie in the k blocks with the smallest
minima), then on those blocks only. A memory is built once per sequence and kept in an LRU
bounded by bytes, on the model's device.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.batching import window_spans
from models.invariant import tiled_matmul
from models.lm import LMCompressor
from models.protocol import Progress, Segment, SegmentBits, Symbols

KEY_BLOCK = 4096  # keys per distance block: fixed, so a distance never depends on the memory's size
MIN_BLOCK = 64  # keys per block minimum in the two-stage top-k
QUERY_CHUNK = 256  # queries per pass over a key block: their distances (4 MB) stay in the cache
_LN2 = math.log(2.0)
_EPS = 1e-6


@dataclass(frozen=True)
class MemoryParams:
    """The stated, fixed parameters of `memory` mode for one model (see the module docstring)."""

    k: int  # neighbours per token
    temperature: float  # T, in squared-distance units of the model's final hidden states
    bias: float  # a
    distance: float  # b, the weight of ln(nearest squared distance)
    run: float  # c, the weight of ln(1 + tokens just matched)
    max_weight: float = 0.9999  # λ_max: the LM keeps at least 1e-4 of the mass
    order: int = 0  # the copy model's context in tokens (0: no copy model)
    copy_bias: float = 0.0  # α
    copy_length: float = 0.0  # β, the weight of ln(tokens the copy has matched)
    copy_max: float = 0.9999  # μ_max

    def as_dict(self) -> dict[str, object]:
        return {
            "k": self.k,
            "temperature": self.temperature,
            "distance": "squared L2 between final hidden states (the vocabulary head's input)",
            "memory": "every token before the scoring window: earlier datasets and the sequence's own",
            "lambda": (
                f"{self.max_weight} * sigmoid({self.bias} + {self.distance} * ln(d_min + 1e-6) "
                f"+ {self.run} * ln(1 + tokens just matched))"
            ),
        } | (
            {
                "copy": (
                    f"the token after the latest earlier occurrence (before the window) of the last {self.order} "
                    "tokens, followed while it predicts right"
                ),
                "copy_weight": f"{self.copy_max} * sigmoid({self.copy_bias} + {self.copy_length} * ln(tokens matched))",
            }
            if self.order
            else {}
        )

    @property
    def key(self) -> str:
        raw = f"{self.k}:{self.temperature}:{self.bias}:{self.distance}:{self.run}:{self.max_weight}"
        if self.order:
            raw += f":{self.order}:{self.copy_bias}:{self.copy_length}:{self.copy_max}"
        return "mem" + hashlib.sha256(raw.encode()).hexdigest()[:12]


@dataclass
class Memory:
    """A sequence as a datastore: row i is token i (position i + 1 of start + sequence)."""

    keys: torch.Tensor  # (n, d) float32: the state that predicted each token
    norms: torch.Tensor  # (n,) float32: squared norms of the keys
    values: torch.Tensor  # (n,) long, CPU: the tokens
    bits: torch.Tensor  # (n,) float64, CPU: each token's bits under the mixture
    hits: torch.Tensor  # (n,) bool, CPU: whether the nearest key named the token
    copy_state: tuple[int, int] = (-1, 0)  # the copy model after the last token: (pointer, tokens matched)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.norms, self.values, self.bits, self.hits))

    def run_at_end(self) -> int:
        """Tokens matched in a row at the end of the sequence."""
        return _run_after(self.hits, 0)


@dataclass
class Neighbours:
    """What the mixture needs for consecutive tokens, and their keys (see `mixture_bits`)."""

    lm_bits: torch.Tensor  # (n,) float64: the LM's bits
    targets: torch.Tensor  # (n,) long: the tokens
    distances: torch.Tensor  # (n, k) float32: squared distances of the nearest keys, inf where none
    tokens: torch.Tensor  # (n, k) long: the tokens those keys predicted
    has_memory: torch.Tensor  # (n,) bool: whether any key was before the token's window
    limits: torch.Tensor  # (n,) long: how many memory rows (tokens) lie before the token's window
    keys: torch.Tensor  # (n, d) float32, on the model's device
    norms: torch.Tensor  # (n,) float32


def sequence_digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


class MemoryCache:
    """Memories of recent sequences, least recently used dropped first, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Memory] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> Memory | None:
        with self._lock:
            memory = self._items.get(digest)
            if memory is not None:
                self._items.move_to_end(digest)
            return memory

    def put(self, digest: str, memory: Memory) -> None:
        size = memory.nbytes
        with self._lock:
            if digest in self._items or size > self.max_bytes:
                return
            self._items[digest] = memory
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def window_starts(positions: torch.Tensor, context: int, stride: int) -> torch.Tensor:
    """First position of the window that scores each position (`WindowPolicy`)."""
    later = ((positions - context).div(stride, rounding_mode="floor") + 1) * stride
    return torch.where(positions < context, torch.zeros_like(positions), later)


def _distances(
    queries: torch.Tensor, q_norms: torch.Tensor, keys_t: torch.Tensor, k_norms: torch.Tensor
) -> torch.Tensor:
    """Squared L2 distances (m, n) of queries to one block of keys (given transposed), clamped
    at 0: (|q|² + |k|²) − 2 q·k, computed in place."""
    dots = tiled_matmul(queries, keys_t) if keys_t.device.type == "cpu" else queries @ keys_t
    out = q_norms[:, None] + k_norms[None, :]
    return out.sub_(dots.mul_(2)).clamp_min_(0)


def _block_topk(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of `dist` (m, n) and their columns; n is a multiple of
    MIN_BLOCK. Exact: the k best lie in the k blocks whose minima are smallest."""
    m, n = dist.shape
    blocks = dist.view(m, n // MIN_BLOCK, MIN_BLOCK)
    kb = min(k, blocks.shape[1])
    best_blocks = blocks.amin(2).topk(kb, dim=1, largest=False).indices  # (m, kb)
    cols = (best_blocks[:, :, None] * MIN_BLOCK + torch.arange(MIN_BLOCK, device=dist.device)).reshape(m, -1)
    vals = dist.gather(1, cols)
    kk = min(k, vals.shape[1])
    top = vals.topk(kk, dim=1, largest=False)
    return top.values, cols.gather(1, top.indices)


def search(
    queries: torch.Tensor,
    keys: torch.Tensor,
    norms: torch.Tensor,
    limits: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of keys[:limits[i]] for each query i: (distances, key rows), each (m, k),
    sorted; missing neighbours (fewer than k keys) have distance inf and row 0. Keys are taken in
    blocks of KEY_BLOCK (zero-padded), so every distance is computed the same way whatever the
    memory's size or the batch; on the CPU queries go QUERY_CHUNK at a time, so a block's
    distances stay in the cache (every step is per query: the chunks change no bits)."""
    m = len(queries)
    device = queries.device
    best_d = torch.full((m, k), math.inf, device=device)
    best_i = torch.zeros((m, k), dtype=torch.long, device=device)
    if m == 0 or len(keys) == 0:
        return best_d, best_i
    q_norms = (queries * queries).sum(1)
    size = QUERY_CHUNK if device.type == "cpu" else m  # a GPU takes the whole product at once
    chunks = [slice(c, c + size) for c in range(0, m, size)]
    for start in range(0, min(int(limits.max()), len(keys)), KEY_BLOCK):
        block = keys[start : start + KEY_BLOCK]
        block_norms = norms[start : start + KEY_BLOCK]
        if len(block) < KEY_BLOCK:
            pad = KEY_BLOCK - len(block)
            block = torch.cat([block, block.new_zeros(pad, block.shape[1])])
            block_norms = torch.cat([block_norms, block_norms.new_zeros(pad)])
        block_t = block.T
        for c in chunks:
            _search_block(queries[c], q_norms[c], limits[c], block_t, block_norms, start, k, best_d[c], best_i[c])
    return best_d, best_i


def _search_block(
    queries: torch.Tensor,
    q_norms: torch.Tensor,
    limits: torch.Tensor,
    block_t: torch.Tensor,
    block_norms: torch.Tensor,
    start: int,
    k: int,
    best_d: torch.Tensor,
    best_i: torch.Tensor,
) -> None:
    """Merge the k nearest keys of one block (its first row is key `start`) into best_d/best_i
    (views, updated in place) for the queries whose limit reaches into the block."""
    active = limits > start
    if not bool(active.any()):
        return
    rows = slice(None) if bool(active.all()) else active.nonzero().squeeze(1)
    dist = _distances(queries[rows], q_norms[rows], block_t, block_norms)
    if int(limits[rows].min()) < start + KEY_BLOCK:  # some query's limit falls inside the block
        columns = torch.arange(start, start + KEY_BLOCK, device=dist.device)
        dist.masked_fill_(columns[None, :] >= limits[rows, None], math.inf)
    d, i = _block_topk(dist, k)
    top = torch.cat([best_d[rows], d], 1).topk(k, dim=1, largest=False)
    best_i[rows] = torch.cat([best_i[rows], i + start], 1).gather(1, top.indices)
    best_d[rows] = top.values


_HASH = np.uint64(0x9E3779B97F4A7C15)
_MAX_MATCH = 1 << 20  # the length a match counts at most (its weight saturates long before)


def copy_predictions(
    sequence: Sequence[int], first: int, limits: Sequence[int], order: int, state: tuple[int, int] = (-1, 0)
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The copy model over tokens first.. of `sequence` (see the module docstring): for each, the
    predicted token (-1: none) and the tokens matched so far, (n,) long and (n,) float64; and its
    state after the last token. `limits[i]` is how many tokens lie before token first + i's
    window (a pointer must stay below it); `state` is the model's after token first - 1."""
    seq = np.asarray(sequence, dtype=np.int64)
    n, m = len(seq), len(seq) - first
    if n <= order or m <= 0:
        return torch.full((max(m, 0),), -1, dtype=torch.long), torch.zeros(max(m, 0), dtype=torch.float64), state
    # h[t]: a hash of the `order` tokens before t (t >= order); found[i]: the latest t' below
    # token first + i's limit with the same hash (-1: none), by a binary search in (hash, t') order.
    h = np.zeros(n, dtype=np.uint64)
    for i in range(1, order + 1):
        h[order:] = (h[order:] * _HASH) ^ seq[order - i : n - i].astype(np.uint64)
    positions = np.arange(order, n, dtype=np.int64)
    by_hash = positions[np.argsort(h[order:], kind="stable")]
    group = np.concatenate([[0], np.cumsum(h[by_hash[1:]] != h[by_hash[:-1]])]).astype(np.int64)
    group_of = np.zeros(n, dtype=np.int64)
    group_of[by_hash] = group
    keys = group * (n + 1) + by_hash  # sorted
    targets = np.arange(first, n, dtype=np.int64)
    limit = np.minimum(np.asarray(limits, dtype=np.int64), targets)
    at = np.searchsorted(keys, group_of[targets] * (n + 1) + limit, side="left") - 1
    ok = (targets >= order) & (at >= 0)
    hit = np.where(ok, at, 0)
    ok &= (group[hit] == group_of[targets]) & (by_hash[hit] >= order)
    found = np.where(ok, by_hash[hit], -1).tolist()
    tokens = seq.tolist()
    ptr, matched = state
    predicted, lengths = [-1] * m, [0] * m
    for i, t in enumerate(range(first, n)):
        if ptr >= limits[i]:
            ptr, matched = -1, 0
        if ptr < 0:
            s = found[i]
            if s >= 0 and tokens[s - order : s] == tokens[t - order : t]:  # not a hash collision
                ptr, matched = s, order
                while matched < min(s, 64) and tokens[s - matched - 1] == tokens[t - matched - 1]:
                    matched += 1  # how far back the occurrence agrees (up to 64 tokens)
        if ptr >= 0:
            predicted[i], lengths[i] = tokens[ptr], matched
            if tokens[t] == tokens[ptr]:
                ptr, matched = ptr + 1, min(matched + 1, _MAX_MATCH)
            else:
                ptr, matched = -1, 0
    return torch.tensor(predicted, dtype=torch.long), torch.tensor(lengths, dtype=torch.float64), (ptr, matched)


def mixture_bits(
    lm_bits: torch.Tensor,
    targets: torch.Tensor,
    dist: torch.Tensor,
    neighbours: torch.Tensor,
    has_memory: torch.Tensor,
    run_before: int,
    params: MemoryParams,
    predicted: torch.Tensor | None = None,
    matched: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits of consecutive tokens under the mixture, and whether each one's nearest key named it.

    lm_bits (n,) float64 and targets (n,) are the tokens in order; dist/neighbours (n, k) their
    neighbours' squared distances and tokens (rows without memory are ignored); `run_before` the
    tokens matched in a row just before the first one; predicted/matched (n,) the copy model's
    (`copy_predictions`; none: no copy model). All on the CPU."""
    hits = has_memory & (neighbours[:, 0] == targets)
    # r[t]: consecutive hits right before t, continuing the run that ended at `run_before`.
    n = len(targets)
    index = torch.arange(n)
    last_miss = torch.where(~hits, index, torch.full_like(index, -1))
    last_miss = torch.cummax(last_miss, 0).values  # latest miss at or before t
    previous_miss = torch.cat([torch.tensor([-1]), last_miss[:-1]])  # latest miss before t
    run = torch.where(previous_miss >= 0, index - 1 - previous_miss, index + run_before).to(torch.float64)
    out = lm_bits.clone()
    rows = has_memory.nonzero().squeeze(1)
    if len(rows):
        d = dist[rows].double()
        nearest = d[:, :1]
        finite = torch.isfinite(d)
        weights = torch.softmax(torch.where(finite, -(d - nearest) / params.temperature, -math.inf), dim=1)
        p_mem = (weights * (neighbours[rows] == targets[rows, None])).sum(1)
        logit = params.bias + params.distance * torch.log(nearest[:, 0] + _EPS) + params.run * torch.log1p(run[rows])
        lam = params.max_weight * torch.sigmoid(logit)
        p_lm = torch.exp2(-lm_bits[rows])
        out[rows] = -torch.log2((1 - lam) * p_lm + lam * p_mem)
    if predicted is not None and matched is not None:
        rows = (predicted >= 0).nonzero().squeeze(1)
        if len(rows):
            mu = params.copy_max * torch.sigmoid(params.copy_bias + params.copy_length * torch.log(matched[rows]))
            right = (predicted[rows] == targets[rows]).to(torch.float64)
            out[rows] = -torch.log2((1 - mu) * torch.exp2(-out[rows]) + mu * right)
    return out, hits


class MemoryCompressor:
    """The `Compressor` of a language model in `memory` mode (see the module docstring).

    Segments that fit one window have an empty memory: their code lengths are the LM's, computed
    by the LM's own `score` (prefix reuse and all). Longer ones are coded a few windows at a time:
    the memory of a prefix X (its keys, tokens and C(X)) is built once and kept in a byte-bounded
    LRU for every later Y; the target's own earlier tokens join the memory as its windows move on.
    """

    def __init__(self, lm: LMCompressor, params: MemoryParams, cache_bytes: int, windows_per_step: int = 8) -> None:
        self.lm = lm
        self.params = params
        self.cache = MemoryCache(cache_bytes)
        self.windows_per_step = windows_per_step  # windows per engine call: bounds the states held at once
        self.info = lm.info.with_mode("memory")

    def encode(self, text: str) -> Symbols:
        return self.lm.encode(text)

    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        segments = list(segments)
        out: list[SegmentBits | None] = [None] * len(segments)
        context = self.lm.window.context_tokens
        short = [i for i, s in enumerate(segments) if 1 + len(s.prefix) + len(s.target) <= context]
        for i, bits in zip(short, self.lm.score([segments[i] for i in short]), strict=True):
            out[i] = bits
        for i, s in enumerate(segments):
            if out[i] is not None:
                continue
            if not s.prefix:
                whole = self.memory(s.target, progress)
                out[i] = SegmentBits(prefix_bits=0.0, target_bits=float(whole.bits.sum()))
            else:
                before = self.memory(s.prefix, progress)
                after = self._code([*s.prefix, *s.target], before, progress)
                out[i] = SegmentBits(prefix_bits=float(before.bits.sum()), target_bits=float(after.bits.sum()))
        return out  # type: ignore[return-value]

    def memory(self, tokens: Symbols, progress: Progress | None = None) -> Memory:
        """The memory of a whole sequence, built once and then taken from the cache."""
        digest = sequence_digest(tokens)
        memory = self.cache.get(digest)
        if memory is None:
            memory = self._code(list(tokens), None, progress)
            self.cache.put(digest, memory)
        return memory

    def _code(self, tokens: list[int], before: Memory | None, progress: Progress | None) -> Memory:
        """Code the tokens after those `before` holds (none: all of them); returns the memory of
        the tokens coded, with their bits."""
        found = self.neighbours(tokens, before, progress)
        run, state = (before.run_at_end(), before.copy_state) if before is not None else (0, (-1, 0))
        predicted = matched = None
        if self.params.order:
            first = len(tokens) - len(found.targets)
            predicted, matched, state = copy_predictions(tokens, first, found.limits.tolist(), self.params.order, state)
        bits, hits = mixture_bits(
            found.lm_bits, found.targets, found.distances, found.tokens, found.has_memory, run, self.params,
            predicted, matched,
        )  # fmt: skip
        return Memory(found.keys, found.norms, found.targets, bits, hits, state)

    def neighbours(self, tokens: Sequence[int], before: Memory | None, progress: Progress | None = None) -> Neighbours:
        """The LM's bits and the k nearest memory entries of every token after those `before`
        holds (none: all of them), a few windows at a time. Independent of the mixture's
        parameters (benchmarks/conditioning_fit.py fits them on this)."""
        tokens = list(tokens)
        start = len(before.values) if before is not None else 0
        n = len(tokens) - start
        device, k = self.lm.device, self.params.k
        keys = torch.zeros(n, self.lm.hidden_size, device=device)
        norms = torch.zeros(n, device=device)
        targets = torch.tensor(tokens[start:], dtype=torch.long)
        memory_values = targets if before is None else torch.cat([before.values, targets])
        lm_bits = torch.zeros(n, dtype=torch.float64)
        distances = torch.full((n, k), math.inf)
        neighbour_tokens = torch.zeros((n, k), dtype=torch.long)
        has_memory = torch.zeros(n, dtype=torch.bool)
        limits = torch.zeros(n, dtype=torch.long)
        ends = [end - 1 for _, end, _ in window_spans(len(tokens) + 1, self.lm.window) if end - 1 > start]
        context, stride = self.lm.window.context_tokens, self.lm.window.stride
        filled = 0
        if progress is not None:
            progress(0, n)
        for step in range(0, len(ends), self.windows_per_step):
            # Tokens [first, end) are scored by the next windows_per_step windows.
            first = start + filled
            end = ends[min(step + self.windows_per_step, len(ends)) - 1]
            ((bits, states),) = self.lm.token_states([tokens[:end]], first=[first])
            states = states.to(device)
            starts = window_starts(torch.arange(first + 1, end + 1), context, stride)
            # Keys of tokens at positions before the window: the prefix's, then this call's own.
            limit_before = (starts - 1).clamp(0, start)
            limit_own = (starts - 1 - start).clamp_min(0)
            rows = slice(filled, end - start)
            # The group's own keys first: a later window of the group sees the earlier ones.
            keys[rows] = states
            norms[rows] = (states * states).sum(1)
            d, found = self._nearest(states, before, limit_before, keys, norms, limit_own)
            lm_bits[rows] = bits
            distances[rows] = d.cpu()
            neighbour_tokens[rows] = memory_values[found.cpu().clamp_max(len(memory_values) - 1)]
            limits[rows] = (limit_before + limit_own).cpu()
            has_memory[rows] = limits[rows] > 0
            if progress is not None:
                progress(end - start - filled, 0)
            filled = end - start
        return Neighbours(lm_bits, targets, distances, neighbour_tokens, has_memory, limits, keys, norms)

    def _nearest(
        self,
        queries: torch.Tensor,
        before: Memory | None,
        limit_before: torch.Tensor,
        keys: torch.Tensor,
        norms: torch.Tensor,
        limit_own: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest keys among the memory `before` (rows 0..) and this call's own keys
        (rows after `before`'s), each query limited to the keys before its window."""
        k, device = self.params.k, queries.device
        offset = len(before.values) if before is not None else 0
        d, rows = search(queries, keys, norms, limit_own.to(device), k)
        rows = rows + offset
        if before is not None and int(limit_before.max()) > 0:
            d0, rows0 = search(queries, before.keys, before.norms, limit_before.to(device), k)
            top = torch.cat([d0, d], 1).topk(k, dim=1, largest=False)
            d, rows = top.values, torch.cat([rows0, rows], 1).gather(1, top.indices)
        return d, rows


def _run_after(hits: torch.Tensor, run: int) -> int:
    """Tokens matched in a row after `hits`, given `run` before them."""
    misses = (~hits).nonzero()
    return len(hits) - 1 - int(misses[-1]) if len(misses) else run + len(hits)
