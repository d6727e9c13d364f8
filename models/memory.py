"""`memory` conditioning: the LM's window extended by a nearest-neighbour memory of the tokens
coded before it (kNN-LM, Khandelwal et al., ICLR 2020) and a copy model, so C(Y|X) sees all of a
dataset X, not only the 2,048 tokens before Y.

What the memory holds. A token at position p of start + sequence is scored by the window that
starts at w(p) = 0 for p < context, else ((p - context) // stride + 1) × stride (`WindowPolicy`).
Its memory is the `horizon` tokens at positions before w(p) (all of them with horizon 0): what
the window cannot see, X's tokens and the sequence's own earlier ones alike (repetitions inside X
count, as in zstd). Each memory entry is keyed by the final hidden state that predicted the token
(the input of the vocabulary head; projected, see Keys) and holds the token. The horizon bounds
the search per token (so the time is linear in the sequence) and the keys held (rows no later
token can reach are dropped, in whole KEY_BLOCKs, as coding moves on: `KeyBuffer`); the copy
model below still looks at every token before w(p), so a copy is found at any depth.

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
hidden states (a separator) and the nearest keys pick any record. Last, an n-gram cache
(models/ngram.py, with `ngram_smoothing`) counts what followed every earlier occurrence of the
last 0..K tokens before the window and blends the counts into p_ng; with weight ν,

    p''(t) = (1 - ν) p'(t) + ν p_ng(t)

(the phrases X repeats, counted over all their occurrences, where the copy model follows one).
Everything λ, p_mem, μ and ν depend on is known to a decoder before t (the states, the memory,
the earlier tokens and whether they matched), and every part is a distribution over the
vocabulary, so the mixture is a decodable code; a token with an empty memory (the first window)
is coded by the LM alone. Coding is
sequential, so C(X·Y) = C(X) + C(Y|X) and C(X) alone is the X part of C(X·Y).

Keys. With `dims` a state is first projected on the vocabulary head's top `dims` right singular
vectors (`head_basis`, computed from the weights alone): the directions the logits respond to
most, so SmolLM2's 576 dimensions become 128 and the search past the horizon costs 2.2× less
(0.71 ms a token instead of 1.58: choosing the top k costs the same at any width). Then it is
rounded to fp16, queries and keys alike, so a key takes 256 B for SmolLM2 (1.2 KB unprojected, 2.3 KB in
fp32; a horizon of 262,144 tokens: ~70 MB); distances are computed in fp32 from the rounded
values. Projection and rounding are part of the code: a decoder does the same. What the rounding
changes is measured by benchmarks/memory_scaling.py precision (docs/BENCHMARKS.md: under 2 bits of
an 84,000-bit C(X), on unprojected keys); what the projection changes, by conditioning_fit.py.

Exact search. The distances are computed in blocks of a fixed number of keys with the engine's
fixed-tile products on the CPU (`models.invariant`), so a query's neighbours never depend on its
batch; top-k runs on block minima first (the k best keys lie in the k blocks with the smallest
minima), then on those blocks only. A memory is built once per sequence and kept in an LRU
bounded by bytes, on the model's device, with the copy model's index of the sequence (its
positions sorted by the hash of the tokens before them, <= 16 B a token), so a Y after X hashes
and sorts only its own positions (`CopyIndex`); what a Y still does over all of X is copying
X's token ids (memcpy speed: ~2 ms for a million).
"""

from __future__ import annotations

import hashlib
import math
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from models.batching import window_spans
from models.invariant import tiled_matmul
from models.lm import LMCompressor, token_ids
from models.ngram import NGramIndex, NGramParams, NGramWeights, ngram_counts, ngram_mixture, token_bits
from models.positions import PositionIndex
from models.protocol import Progress, Segment, SegmentBits, Symbols

KEY_BLOCK = 4096  # keys per distance block: fixed, so a distance never depends on the memory's size
MIN_BLOCK = 64  # keys per block minimum in the two-stage top-k
QUERY_CHUNK = 256  # queries per pass over a key block: their distances (4 MB) stay in the cache
_LN2 = math.log(2.0)
_EPS = 1e-6
KEY_DTYPE = torch.float16  # how the memory stores a state (see the module docstring)


@dataclass(frozen=True)
class MemoryParams(NGramParams):
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
    horizon: int = 0  # the kNN memory holds this many tokens before the window (0: all of them)
    dims: int = 0  # keys: the states projected on the head's top `dims` right singular vectors (0: the states)
    scaled: bool = False  # with dims: each direction scaled by its singular value (distances of logits)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "k": self.k,
            "temperature": self.temperature,
            "distance": (
                f"squared L2 between final hidden states (the vocabulary head's input) projected on the head's "
                f"top {self.dims} right singular vectors{' times their singular values' if self.scaled else ''}, "
                "rounded to fp16"
                if self.dims
                else "squared L2 between final hidden states (the vocabulary head's input), rounded to fp16"
            ),
            "memory": (
                f"the {self.horizon} tokens before the scoring window"
                if self.horizon
                else "every token before the scoring window"
            )
            + ": earlier datasets and the sequence's own",
            "lambda": (
                f"{self.max_weight} * sigmoid({self.bias} + {self.distance} * ln(d_min + 1e-6) "
                f"+ {self.run} * ln(1 + tokens just matched))"
            ),
        }
        if self.order:
            out["copy"] = (
                f"the token after the latest earlier occurrence (anywhere before the window) of the last "
                f"{self.order} tokens, followed while it predicts right"
            )
            weight = f"sigmoid({self.copy_bias} + {self.copy_length} * ln(tokens matched))"
            out["copy_weight"] = f"{self.copy_max} * {weight}"
        out |= self.ngram_description()
        return out

    @property
    def key(self) -> str:
        raw = f"{self.k}:{self.temperature}:{self.bias}:{self.distance}:{self.run}:{self.max_weight}:{KEY_DTYPE}"
        raw += f":{self.horizon}"
        if self.dims:
            raw += f":{self.dims}:{self.scaled}"
        if self.order:
            raw += f":{self.order}:{self.copy_bias}:{self.copy_length}:{self.copy_max}"
        raw += self.ngram_key()
        return "mem" + hashlib.sha256(raw.encode()).hexdigest()[:12]


@dataclass
class Memory:
    """A sequence as a datastore: row i is token i (position i + 1 of start + sequence)."""

    keys: torch.Tensor  # (n - key_offset, d) KEY_DTYPE: the state that predicted each token from key_offset on
    norms: torch.Tensor  # (n - key_offset,) float32: squared norms of the keys (of their fp32 values)
    values: torch.Tensor  # (n,) long, CPU: the tokens
    bits: torch.Tensor  # (n,) float64, CPU: each token's bits under the mixture
    hits: torch.Tensor  # (n,) bool, CPU: whether the nearest key named the token
    copy_state: tuple[int, int] = (-1, 0)  # the copy model after the last token: (pointer, tokens matched)
    key_offset: int = 0  # keys[0] is row key_offset's (rows below it are beyond every later token's horizon)
    copy_index: CopyIndex | None = None  # the copy model's lookup of every position (None: rebuilt when needed)
    ngram_index: NGramIndex | None = None  # the n-gram cache's index of every position (None: rebuilt)

    @property
    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in (self.keys, self.norms, self.values, self.bits, self.hits))
        tables = (self.copy_index.nbytes if self.copy_index is not None else 0) + (
            self.ngram_index.nbytes if self.ngram_index is not None else 0
        )
        return tensors + tables

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
    keys: torch.Tensor  # (n - key_offset, d) KEY_DTYPE, on the model's device: rows key_offset..
    norms: torch.Tensor  # (n - key_offset,) float32
    key_offset: int = 0  # rows below it were beyond every later token's horizon, and dropped


class KeyBuffer:
    """The keys of rows [offset, end) of a sequence being coded, appended a step at a time; rows
    below a floor are dropped in whole KEY_BLOCKs, so with a horizon it holds about `horizon` rows
    however long the sequence. Growth doubles and a drop compacts once half is dead: amortised
    O(1) copies a row."""

    def __init__(self, dim: int, device: torch.device | str) -> None:
        self.keys = torch.zeros(0, dim, dtype=KEY_DTYPE, device=device)
        self.norms = torch.zeros(0, device=device)
        self.offset = self.end = 0
        self._first = 0  # index in self.keys of row `offset`

    def append(self, states: torch.Tensor) -> None:
        live = self.end - self.offset
        if self._first + live + len(states) > len(self.keys):
            self._resize(max(2 * live, live + len(states), KEY_BLOCK))
        at = self._first + live
        self.keys[at : at + len(states)] = states
        self.norms[at : at + len(states)] = (states * states).sum(1)
        self.end += len(states)

    def drop_below(self, row: int) -> None:
        row = min(row, self.end) // KEY_BLOCK * KEY_BLOCK
        if row <= self.offset:
            return
        self._first += row - self.offset
        self.offset = row
        if self._first >= self.end - self.offset:  # more dead rows than live ones: compact
            self._resize(max(self.end - self.offset, KEY_BLOCK))

    def _resize(self, capacity: int) -> None:
        live = slice(self._first, self._first + self.end - self.offset)
        keys = self.keys.new_zeros(capacity, self.keys.shape[1])
        norms = self.norms.new_zeros(capacity)
        keys[: live.stop - live.start], norms[: live.stop - live.start] = self.keys[live], self.norms[live]
        self.keys, self.norms, self._first = keys, norms, 0

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live keys and their norms (rows offset..end)."""
        live = slice(self._first, self._first + self.end - self.offset)
        return self.keys[live], self.norms[live]

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The live keys and norms in tensors of their own (what a kept memory holds)."""
        if self._first or self.end - self.offset < len(self.keys):
            self._resize(self.end - self.offset)
        return self.keys, self.norms


def sequence_digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.fromiter(tokens, dtype=np.int64, count=len(tokens)).tobytes()).hexdigest()


class RecentDigests:
    """`sequence_digest` of the last few token tuples seen, by identity: the worker hands the same
    tuple for a matrix row's X to every Y (its SymbolCache), so X is hashed once, not once per Y
    (~30 ms for a million tokens, more than a Y's own work on a GPU). Tuples only, as they cannot
    change; an entry holds its tuple, so its id is not reused while it is remembered."""

    def __init__(self, size: int = 2) -> None:
        self._items: OrderedDict[int, tuple[tuple, str]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def __call__(self, tokens: Sequence[int]) -> str:
        if not isinstance(tokens, tuple):
            return sequence_digest(tokens)
        with self._lock:
            seen = self._items.get(id(tokens))
            if seen is not None and seen[0] is tokens:
                self._items.move_to_end(id(tokens))
                return seen[1]
        digest = sequence_digest(tokens)
        with self._lock:
            self._items[id(tokens)] = (tokens, digest)
            self._items.move_to_end(id(tokens))
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return digest


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
    floors: torch.Tensor | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest keys of rows floors[i] <= row < limits[i] for each query i (floors: 0 if
    None): (distances, key rows), each (m, k), sorted; missing neighbours (fewer than k keys)
    have distance inf and row 0. keys[0] is row `offset` (a multiple of KEY_BLOCK: the rows before
    it were dropped). Keys are taken in blocks of KEY_BLOCK rows (zero-padded), so every distance
    is computed the same way whatever the memory's size or the batch; on the CPU queries go
    QUERY_CHUNK at a time, so a block's distances stay in the cache (every step is per query: the
    chunks change no bits)."""
    m = len(queries)
    device = queries.device
    best_d = torch.full((m, k), math.inf, device=device)
    best_i = torch.zeros((m, k), dtype=torch.long, device=device)
    if m == 0 or len(keys) == 0:
        return best_d, best_i
    if floors is None:
        floors = torch.zeros_like(limits)
    if offset % KEY_BLOCK or bool(((limits > floors) & (floors < offset)).any()):
        raise ValueError(f"a query needs rows below {offset}, which were dropped")
    q_norms = (queries * queries).sum(1)
    size = QUERY_CHUNK if device.type == "cpu" else m  # a GPU takes the whole product at once
    chunks = [slice(c, c + size) for c in range(0, m, size)]
    lowest = int(floors.min()) // KEY_BLOCK * KEY_BLOCK
    for start in range(max(lowest, offset), min(int(limits.max()), offset + len(keys)), KEY_BLOCK):
        block = keys[start - offset : start - offset + KEY_BLOCK].float()  # exact: fp16 values are fp32 values
        block_norms = norms[start - offset : start - offset + KEY_BLOCK]
        if len(block) < KEY_BLOCK:
            pad = KEY_BLOCK - len(block)
            block = torch.cat([block, block.new_zeros(pad, block.shape[1])])
            block_norms = torch.cat([block_norms, block_norms.new_zeros(pad)])
        block_t = block.T
        for c in chunks:
            _search_block(
                queries[c], q_norms[c], floors[c], limits[c], block_t, block_norms, start, k, best_d[c], best_i[c]
            )
    return best_d, best_i


def _search_block(
    queries: torch.Tensor,
    q_norms: torch.Tensor,
    floors: torch.Tensor,
    limits: torch.Tensor,
    block_t: torch.Tensor,
    block_norms: torch.Tensor,
    start: int,
    k: int,
    best_d: torch.Tensor,
    best_i: torch.Tensor,
) -> None:
    """Merge the k nearest keys of one block (its first row is key `start`) into best_d/best_i
    (views, updated in place) for the queries whose rows [floor, limit) reach into the block."""
    active = (limits > start) & (floors < start + KEY_BLOCK)
    if not bool(active.any()):
        return
    rows = slice(None) if bool(active.all()) else active.nonzero().squeeze(1)
    dist = _distances(queries[rows], q_norms[rows], block_t, block_norms)
    columns = None
    if int(limits[rows].min()) < start + KEY_BLOCK:  # some query's limit falls inside the block
        columns = torch.arange(start, start + KEY_BLOCK, device=dist.device)
        dist.masked_fill_(columns[None, :] >= limits[rows, None], math.inf)
    if int(floors[rows].max()) > start:  # some query's floor falls inside the block
        columns = torch.arange(start, start + KEY_BLOCK, device=dist.device) if columns is None else columns
        dist.masked_fill_(columns[None, :] < floors[rows, None], math.inf)
    d, i = _block_topk(dist, k)
    top = torch.cat([best_d[rows], d], 1).topk(k, dim=1, largest=False)
    best_i[rows] = torch.cat([best_i[rows], i + start], 1).gather(1, top.indices)
    best_d[rows] = top.values


_HASH = np.uint64(0x9E3779B97F4A7C15)
_MAX_MATCH = 1 << 20  # the length a match counts at most (its weight saturates long before)
_CHUNK = 1 << 16  # tokens a time in _latest_occurrences


def copy_predictions(
    sequence: Sequence[int],
    first: int,
    limits: Sequence[int] | torch.Tensor,
    order: int,
    state: tuple[int, int] = (-1, 0),
    earlier: CopyIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], CopyIndex | None]:
    """The copy model over tokens first.. of `sequence` (see the module docstring): for each, the
    predicted token (-1: none) and the tokens matched so far, (n,) long and (n,) float64; its
    state after the last token; and the lookup of the positions first.. (`CopyIndex`; None if
    there are none). `limits[i]` is how many tokens lie before token first + i's window (a
    pointer must stay below it); `state` is the model's after token first - 1; `earlier`, the
    lookup of the positions before `first` if the caller kept it (a memory of X keeps X's, so a
    Y after X hashes and sorts Y's positions only), else they are indexed here. Holds ~40 bytes a
    token while it runs (~70 while it looks the occurrences up)."""
    seq = np.asarray(sequence, dtype=np.int64)
    n, m = len(seq), len(seq) - first
    if n <= order or m <= 0:
        nothing = torch.full((max(m, 0),), -1, dtype=torch.long), torch.zeros(max(m, 0), dtype=torch.float64)
        return *nothing, state, None
    limits = np.asarray(limits, dtype=np.int64)
    index, hashes = CopyIndex.build(seq, first if earlier is not None else 0, order)
    found = _ints(_latest_occurrences(first, limits, hashes, index, earlier))
    del hashes
    tokens, limits = _ints(seq), _ints(limits)
    del seq
    ptr, matched = state
    predicted, lengths = array("q", [-1]) * m, array("d", [0.0]) * m
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
    as_long = torch.from_numpy(np.frombuffer(predicted, dtype=np.int64))
    return as_long, torch.from_numpy(np.frombuffer(lengths, dtype=np.float64)), (ptr, matched), index


def _ints(values: np.ndarray) -> array:
    """int64 values as an array.array: 8 bytes an entry where a list takes ~36, as fast to index."""
    return array("q", np.ascontiguousarray(values, dtype=np.int64).tobytes())


class CopyIndex(PositionIndex):
    """The copy model's lookup of positions low..low + size - 1 of a sequence (low >= order): each
    keyed by the hash of the `order` tokens before it (`PositionIndex`); a memory keeps its
    sequence's."""

    @staticmethod
    def build(seq: np.ndarray, low: int, order: int) -> tuple[CopyIndex, np.ndarray]:
        """The index of positions max(low, order).. of `seq`, and their hashes, in position order."""
        n, low = len(seq), max(low, order)
        h = np.zeros(max(n - low, 0), dtype=np.uint64)
        for i in range(1, order + 1):
            h = (h * _HASH) ^ seq[low - i : n - i].astype(np.uint64)
        return CopyIndex.of(h, low), h  # type: ignore[return-value]


def _latest_occurrences(
    first: int, limits: np.ndarray, hashes: np.ndarray, index: CopyIndex, earlier: CopyIndex | None
) -> np.ndarray:
    """For each token t >= first, the latest position s < min(limits[t - first], t) whose `order`
    tokens before it hash as t's do (-1: none); a hash only, so the caller compares the tokens.
    `index` holds the positions from index.low on and `hashes` their hashes; `earlier` the
    positions before `first`, where `index` starts at `first`."""
    out = np.full(len(limits), -1, dtype=np.int64)
    end = index.low + index.size
    for c in range(max(index.low, first), end, _CHUNK):  # in chunks: the temporaries stay small
        t = np.arange(c, min(c + _CHUNK, end), dtype=np.int64)
        h, below = hashes[t - index.low], np.minimum(limits[t - first], t)
        found = index.latest(h, below)
        if earlier is not None:
            found = np.where(found >= 0, found, earlier.latest(h, below))
        out[t - first] = found
    return out


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
    (`copy_predictions`; none: no copy model). All on the CPU. The same as `knn_mixture` then
    `copy_mixture`, which `MemoryCompressor` applies a step of tokens at a time."""
    out, hits = knn_mixture(lm_bits, targets, dist, neighbours, has_memory, run_before, params)
    if predicted is not None and matched is not None:
        out = copy_mixture(out, targets, predicted, matched, params)
    return out, hits


def knn_mixture(
    lm_bits: torch.Tensor,
    targets: torch.Tensor,
    dist: torch.Tensor,
    neighbours: torch.Tensor,
    has_memory: torch.Tensor,
    run_before: int,
    params: MemoryParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM and the kNN memory mixed (`mixture_bits` without the copy model): each token's bits
    depend on its own row and on the run of hits before it only, so consecutive slices of tokens
    can be mixed one after another (`run_before` carries the run across)."""
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
    return out, hits


class CopyWeights(Protocol):
    """The copy model's weight parameters (`MemoryParams`, `models.adapt.AdaptParams`)."""

    copy_bias: float
    copy_length: float
    copy_max: float


def copy_mixture(
    bits: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor, matched: torch.Tensor, params: CopyWeights
) -> torch.Tensor:
    """`bits` (n,) float64 mixed with the copy model's predictions (`copy_predictions`)."""
    out = bits.clone()
    rows = (predicted >= 0).nonzero().squeeze(1)
    if len(rows):
        mu = params.copy_max * torch.sigmoid(params.copy_bias + params.copy_length * torch.log(matched[rows]))
        right = (predicted[rows] == targets[rows]).to(torch.float64)
        out[rows] = -torch.log2((1 - mu) * torch.exp2(-out[rows]) + mu * right)
    return out


class CachesParams(CopyWeights, NGramWeights, Protocol):
    """What `mix_caches` reads: the copy model's order and weights, the n-gram cache's parameters."""

    order: int

    @property
    def ngram_order(self) -> int: ...


def mix_caches(
    bits: torch.Tensor,
    seq: np.ndarray,
    start: int,
    limits: torch.Tensor,
    params: CachesParams,
    vocab: int,
    copy_state: tuple[int, int],
    copy_index: CopyIndex | None,
    ngram_index: NGramIndex | None,
) -> tuple[torch.Tensor, tuple[int, int], CopyIndex | None, NGramIndex | None]:
    """`bits` (of seq[start:], float64) mixed with the copy model (if `params.order`), then with
    the n-gram cache (if it has one), each seeing the positions below `limits`: how `memory` and
    `adapt` both end their code. `copy_state` is the copy model's after seq[start - 1];
    `copy_index` and `ngram_index` index seq[:start] if the caller kept them. Returns the bits, the
    copy model's state after the last token, and the lookup and index of the positions this call
    indexed (all of seq's when nothing came before)."""
    targets = torch.from_numpy(seq[start:])
    if params.order:
        predicted, matched, copy_state, copy_index = copy_predictions(
            seq, start, limits, params.order, copy_state, copy_index
        )
        bits = copy_mixture(bits, targets, predicted, matched, params)
    if params.ngram_smoothing:
        followed, occurred, ngram_index = ngram_counts(
            seq, start, limits.numpy(), params.ngram_order, token_bits(vocab), ngram_index
        )
        bits = ngram_mixture(bits, followed, occurred, params, vocab)
    return bits, copy_state, copy_index, ngram_index


class MemoryCompressor:
    """The `Compressor` of a language model in `memory` mode (see the module docstring).

    Segments that fit one window have an empty memory: their code lengths are the LM's, computed
    by the LM's own `score` (prefix reuse and all). Longer ones are coded a few windows at a time:
    the memory of a prefix X (its keys, tokens and C(X)) is built once and kept in a byte-bounded
    LRU for every later Y (a memory over the bound serves the rest of the call that built it and
    is then dropped); the target's own earlier tokens join the memory as its windows move on.
    """

    def __init__(self, lm: LMCompressor, params: MemoryParams, cache_bytes: int, windows_per_step: int = 8) -> None:
        self.lm = lm
        self.params = params
        self.cache = MemoryCache(cache_bytes)
        self.windows_per_step = windows_per_step  # windows per engine call: bounds the states held at once
        self.digest = RecentDigests()
        self.info = lm.info.with_mode("memory")
        self.basis = head_basis(lm.head_weight, params.dims, params.scaled).to(lm.device) if params.dims else None
        self.key_dim = params.dims or lm.hidden_size
        self.vocab = int(lm.head_weight.shape[0])
        params.check_ngram(self.vocab)

    def keys_of(self, states: torch.Tensor) -> torch.Tensor:
        """Final hidden states (n, hidden) as memory keys and queries, float32 on the memory's device
        with fp16 values (projected first if the parameters say so; batch-invariant on the CPU)."""
        states = states.to(self.lm.device)
        if self.basis is not None:
            on_cpu = states.device.type == "cpu"
            states = tiled_matmul(states.float(), self.basis) if on_cpu else states.float() @ self.basis
        return states.to(KEY_DTYPE).float()

    def encode(self, text: str) -> Symbols:
        return self.lm.encode(text)

    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        segments = list(segments)
        out: list[SegmentBits | None] = [None] * len(segments)
        context = self.lm.window.context_tokens
        short = [i for i, s in enumerate(segments) if 1 + len(s.prefix) + len(s.target) <= context]
        for i, bits in zip(short, self.lm.score([segments[i] for i in short], progress=progress), strict=True):
            out[i] = bits
        # Segments that need the same memory (X alone, X before a Y) are coded one after another,
        # and the last memory built is held for them even when it is over the cache's bound (it
        # was just built, so that costs no more memory than building it did).
        needs = {i: self.digest(s.prefix or s.target) for i, s in enumerate(segments) if out[i] is None}
        held: dict[str, Memory] = {}
        for i in sorted(needs, key=lambda i: (needs[i], i)):
            s = segments[i]
            if not s.prefix:
                whole = self.memory(s.target, progress, held, needs[i])
                out[i] = SegmentBits(prefix_bits=0.0, target_bits=float(whole.bits.sum()))
            else:
                before = self.memory(s.prefix, progress, held, needs[i])
                after = self._code(s.target, before, progress)
                out[i] = SegmentBits(prefix_bits=float(before.bits.sum()), target_bits=float(after.bits.sum()))
        return out  # type: ignore[return-value]

    def memory(
        self, tokens: Symbols, progress: Progress | None = None, held: dict | None = None, digest: str | None = None
    ) -> Memory:
        """The memory of a whole sequence, built once and then taken from the cache (or from
        `held`, where the caller keeps the last one built, cached or not); `digest`: the tokens'
        `sequence_digest`, if the caller has it."""
        digest = digest or self.digest(tokens)
        memory = (held or {}).get(digest) or self.cache.get(digest)
        if memory is None:
            memory = self._code(tokens, None, progress)
            self.cache.put(digest, memory)
        if held is not None:
            held.clear()
            held[digest] = memory
        return memory

    def _code(self, following: Sequence[int], before: Memory | None, progress: Progress | None) -> Memory:
        """Code the tokens that follow those `before` holds (none: a sequence of its own);
        returns the memory of the tokens coded, with their bits. The kNN part of the mixture is
        applied a step at a time, so only a step's neighbours are ever held (not k of them for
        every token: ~200 B a token); the copy model and the n-gram cache then run over the whole
        sequence (`mix_caches`)."""
        sequence = _sequence(following, before)
        start, n = len(sequence) - len(following), len(following)
        own = KeyBuffer(self.key_dim, self.lm.device)
        targets = sequence[start:]
        bits = torch.zeros(n, dtype=torch.float64)
        hits = torch.zeros(n, dtype=torch.bool)
        limits = torch.zeros(n, dtype=torch.long)
        run, state = (before.run_at_end(), before.copy_state) if before is not None else (0, (-1, 0))
        for rows, lm_bits, distances, neighbour_tokens, step_limits in self._steps(sequence, before, own, progress):
            bits[rows], hits[rows] = knn_mixture(
                lm_bits, targets[rows], distances, neighbour_tokens, step_limits > 0, run, self.params
            )
            limits[rows] = step_limits
            run = _run_after(hits[rows], run)
        bits, state, index, grams = mix_caches(
            bits,
            sequence.numpy(),
            start,
            limits,
            self.params,
            self.vocab,
            state,
            before.copy_index if before is not None else None,
            before.ngram_index if before is not None else None,
        )
        del limits
        keys, norms = own.take()
        # The copy model's lookup and the n-gram index cover this call's positions: all of them
        # only when nothing came before.
        if before is not None:
            index = grams = None
        return Memory(keys, norms, targets, bits, hits, state, own.offset, index, grams)

    def neighbours(self, tokens: Sequence[int], before: Memory | None, progress: Progress | None = None) -> Neighbours:
        """The LM's bits and the k nearest memory entries of every token after those `before`
        holds (none: all of them). Independent of the mixture's parameters
        (benchmarks/conditioning_fit.py fits them on this)."""
        start = len(before.values) if before is not None else 0
        sequence = _sequence(tokens[start:], before)
        n, k = len(tokens) - start, self.params.k
        own = KeyBuffer(self.key_dim, self.lm.device)
        lm_bits = torch.zeros(n, dtype=torch.float64)
        distances = torch.full((n, k), math.inf)
        neighbour_tokens = torch.zeros((n, k), dtype=torch.long)
        limits = torch.zeros(n, dtype=torch.long)
        for rows, bits, d, found, step_limits in self._steps(sequence, before, own, progress):
            lm_bits[rows], distances[rows], neighbour_tokens[rows], limits[rows] = bits, d, found, step_limits
        keys, norms = own.take()
        targets = sequence[start:]
        return Neighbours(lm_bits, targets, distances, neighbour_tokens, limits > 0, limits, keys, norms, own.offset)

    def _steps(
        self, sequence: torch.Tensor, before: Memory | None, own: KeyBuffer, progress: Progress | None
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The tokens of `sequence` (`_sequence`: `before`'s, then those after them) after those
        `before` holds, a few windows at a time: for each step, the rows it covers (0: token
        len(before)), the LM's bits, the k nearest memory entries' squared distances and tokens,
        and how many memory rows lie before each token's window, all on the CPU. Their keys go
        into `own` (rows no later token reaches are dropped)."""
        start = len(before.values) if before is not None else 0
        n = len(sequence) - start
        ends = [end - 1 for _, end, _ in window_spans(len(sequence) + 1, self.lm.window) if end - 1 > start]
        context, stride = self.lm.window.context_tokens, self.lm.window.stride
        filled = 0
        if progress is not None:
            progress(0, n)
        for step in range(0, len(ends), self.windows_per_step):
            # Tokens [first, end) are scored by the next windows_per_step windows.
            first = start + filled
            end = ends[min(step + self.windows_per_step, len(ends)) - 1]
            ((bits, states),) = self.lm.token_states([sequence[:end]], first=[first])
            states = self.keys_of(states)  # the rounding the memory keeps
            starts = window_starts(torch.arange(first + 1, end + 1), context, stride)
            # Keys of tokens at positions before the window: the prefix's, then this call's own.
            limit_before = (starts - 1).clamp(0, start)
            limit_own = (starts - 1 - start).clamp_min(0)
            floor = self._floors(starts)
            floor_before, floor_own = floor.clamp(0, start), (floor - start).clamp_min(0)
            # The group's own keys first: a later window of the group sees the earlier ones.
            own.append(states)
            keys, norms = own.view()
            d, found = self._nearest(
                states, before, (floor_before, limit_before), (keys, norms, own.offset), (floor_own, limit_own)
            )
            own.drop_below(int(floor_own[-1]))  # no later token reaches below its floor
            found_tokens = sequence[found.cpu().clamp_max(len(sequence) - 1)]  # a memory row's value is its token
            yield slice(filled, end - start), bits, d.cpu(), found_tokens, (limit_before + limit_own).cpu()
            if progress is not None:
                progress(end - start - filled, 0)
            filled = end - start
        # What follows reaches no lower than the next token's floor: a kept memory holds only that.
        own.drop_below(int(self._floors(window_starts(torch.tensor([len(sequence) + 1]), context, stride))[0]) - start)

    def _floors(self, starts: torch.Tensor) -> torch.Tensor:
        """The lowest memory row each token's kNN search reaches, from its window's start: `horizon`
        rows below the window (0 without a horizon)."""
        if not self.params.horizon:
            return torch.zeros_like(starts)
        return (starts - 1 - self.params.horizon).clamp_min(0)

    def _nearest(
        self,
        queries: torch.Tensor,
        before: Memory | None,
        range_before: tuple[torch.Tensor, torch.Tensor],
        own: tuple[torch.Tensor, torch.Tensor, int],
        range_own: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest keys among the memory `before` (rows 0..) and this call's own keys
        (rows after `before`'s), each query limited to its rows [floor, limit): the keys before
        its window, within the horizon."""
        k, device = self.params.k, queries.device
        offset = len(before.values) if before is not None else 0
        (floor_own, limit_own), (floor_before, limit_before) = range_own, range_before
        keys, norms, key_offset = own
        d, rows = search(queries, keys, norms, limit_own.to(device), k, floor_own.to(device), key_offset)
        rows = rows + offset
        if before is not None and bool((limit_before > floor_before).any()):
            floors, limits = floor_before.to(device), limit_before.to(device)
            d0, rows0 = search(queries, before.keys, before.norms, limits, k, floors, before.key_offset)
            top = torch.cat([d0, d], 1).topk(k, dim=1, largest=False)
            d, rows = top.values, torch.cat([rows0, rows], 1).gather(1, top.indices)
        return d, rows


def head_basis(head_weight: torch.Tensor, dims: int, scaled: bool) -> torch.Tensor:
    """(hidden, dims) float32 on the CPU: the top `dims` right singular vectors of the vocabulary
    head (the directions of a state the logits respond to most), times their singular values if
    `scaled` (then distances are those of the logits, restricted to these directions). Computed
    in float64 from the weights alone, so every process that loads the model gets the same one."""
    _, values, vh = torch.linalg.svd(head_weight.detach().to("cpu", torch.float64), full_matrices=False)
    basis = vh[:dims].T
    if scaled:
        basis = basis * values[:dims]
    return basis.to(torch.float32).contiguous()


def _sequence(following: Sequence[int], before: Memory | None) -> torch.Tensor:
    """Every token of a sequence as one tensor, made once (each step passes a prefix of it to the
    model, and a memory row's value is its token): `before`'s tokens, then `following`."""
    tail = token_ids(following)
    return tail if before is None else torch.cat([before.values, tail])


def _run_after(hits: torch.Tensor, run: int) -> int:
    """Tokens matched in a row after `hits`, given `run` before them."""
    misses = (~hits).nonzero()
    return len(hits) - 1 - int(misses[-1]) if len(misses) else run + len(hits)
