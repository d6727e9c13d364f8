"""Windows and batches: how the LM engine cuts its work into forward passes.

1. Windows. A sequence longer than the context is scored with the position-only sliding windows
   of `WindowPolicy` (`window_spans`), so a token's score never depends on what follows it: C(X)
   alone equals the X part of C(X·Y).
2. Batches. Work items (windows, or targets after a prefix state) are sorted by length and cut
   into consecutive runs whose cost fits a token budget (`Batcher.cut`): `batch_tokens`, within a
   device-memory budget estimated per token, and below any size that ran out of memory before.
   A batch is packed (`models.packing`: no padding, one row; varlen flash attention on CUDA,
   attention per window on the CPU, measured 1.6x faster there than padded rows on mixed
   lengths: docs/BENCHMARKS.md, "Scoring engine") or padded rows (`prepare_windows`).
3. Running them (`Batcher.run`). On CUDA the next batch is prepared on the CPU (a helper thread)
   while the device runs the current one, and results stay on the device until the end of the
   call. A batch that runs out of device memory is split in halves and retried, and later batches
   are formed smaller; only a single item that does not fit fails.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from models.prefix_cache import PackedPrefixState
from models.protocol import Progress, WindowPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
T = TypeVar("T")


def window_spans(n_positions: int, policy: WindowPolicy) -> list[tuple[int, int, int]]:
    """(start, end, score_from) of each window over positions [0, n_positions) of BOS + sequence.

    Window k covers [k*stride, k*stride + context); window 0 scores positions 1.., window k >= 1
    scores [context + (k-1)*stride, context + k*stride). Only positions decide, never content.
    """
    context, stride = policy.context_tokens, policy.stride
    if n_positions <= 1:
        return []
    spans = [(0, min(context, n_positions), 1)]
    k = 1
    while context + (k - 1) * stride < n_positions:
        start = k * stride
        spans.append((start, min(start + context, n_positions), context + (k - 1) * stride))
        k += 1
    return spans


@dataclass(frozen=True)
class Window:
    """Positions [start, end) of one sequence (index `seq`, BOS at 0) in one forward pass;
    positions [score_from, end) are scored."""

    seq: int
    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start


def packed_cost(batch: list[Window]) -> int:
    return sum(w.length for w in batch)


def padded_cost(batch: list[Window]) -> int:
    return len(batch) * max(w.length for w in batch)


@dataclass
class Prepared:
    """One batch as tensors, ready to move to the device.

    Padded: `ids` is (rows, width), right-padded (causal attention never looks at the padding, so
    no mask is needed). Packed: `ids` is (1, total) with `positions` restarting at 0 for each window
    and `cu_seq_lens` delimiting them. `index` picks, from the flattened hidden states, the position
    that predicts each entry of `targets`."""

    ids: torch.Tensor
    index: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    bounds: list[int] | None = None
    # Packed targets after prefix states: the states (in bank order), each window's key rows
    # (an index into [prefix rows; own rows]) and the key windows' bounds.
    states: list[PackedPrefixState] | None = None
    kv_index: torch.Tensor | None = None
    bounds_k: list[int] | None = None
    items: list | None = None  # what the batch was made from, where `run` needs it

    def pinned(self) -> Prepared:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return dataclasses.replace(
            self,
            ids=pin(self.ids),
            index=pin(self.index),
            targets=pin(self.targets),
            positions=pin(self.positions),
            cu_seq_lens=pin(self.cu_seq_lens),
            kv_index=pin(self.kv_index),
        )


def prepare_windows(batch: list[Window], full: list[torch.Tensor], packing: bool, pad_id: int) -> Prepared:
    """A batch of windows over the sequences `full` (BOS + tokens): packed, or rows padded with `pad_id`."""
    targets = torch.cat([full[w.seq][w.score_from : w.end] for w in batch])
    # The hidden state at position p - 1 predicts the token at position p.
    predictors = [torch.arange(w.score_from - 1, w.end - 1) - w.start for w in batch]
    if packing:
        lengths = [w.length for w in batch]
        bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        ids = torch.cat([full[w.seq][w.start : w.end] for w in batch])[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        index = torch.cat([bounds[r] + p for r, p in enumerate(predictors)])
        cu = torch.tensor(bounds, dtype=torch.int32)
        return Prepared(ids=ids, index=index, targets=targets, positions=positions, cu_seq_lens=cu, bounds=bounds)
    width = max(w.length for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for r, w in enumerate(batch):
        ids[r, : w.length] = full[w.seq][w.start : w.end]
    index = torch.cat([r * width + p for r, p in enumerate(predictors)])
    return Prepared(ids=ids, index=index, targets=targets)


def totals_in_order(done: list[tuple[list, torch.Tensor]], lengths: list[int], order: list[int]) -> list[float]:
    """Each target's total bits from the per-token bits of the batches run (targets in the sorted
    order whose lengths are `lengths`), put back in input order: target order[k] is sorted one k."""
    bits = torch.cat([b for _, b in done]).to("cpu", torch.float64) if done else torch.zeros(0)
    result = [0.0] * len(order)
    for i, part in zip(order, bits.split(lengths), strict=True):
        result[i] = float(part.sum())
    return result


def activation_bytes_per_token(model: PreTrainedModel) -> int:
    """A generous estimate of the activation memory one token of a batch holds at the peak of a
    forward pass (inference: one layer's intermediates live at a time)."""
    config = model.config
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    elements = 6 * hidden + 3 * inter + 2 * (heads + 2 * kv_heads) * head_dim
    return elements * model.dtype.itemsize


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Cached key/value bytes of one token, all layers."""
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * model.dtype.itemsize


class Batcher:
    """Cuts work into batches by a token budget and runs them on `device`.

    `batch_tokens` caps a batch's tokens; `batch_memory_bytes` (optional) caps them so that their
    activations (`token_bytes` each) and one chunk of the head's logits (`head_bytes`) fit; after
    an out-of-memory error, batches stay below half of the one that failed (`oom_splits` counts
    the splits).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        batch_tokens: int,
        batch_memory_bytes: int | None,
        token_bytes: int,
        head_bytes: int,
    ) -> None:
        self.device = device
        self.batch_tokens = batch_tokens
        self.batch_memory_bytes = batch_memory_bytes
        self.token_bytes = token_bytes
        self.head_bytes = head_bytes
        self.oom_cap: int | None = None  # tokens per batch known to fit, after an OOM
        self.oom_splits = 0
        self._prefetch: ThreadPoolExecutor | None = None

    def token_limit(self) -> int:
        """Tokens one batch may hold: batch_tokens, within the memory budget and below any OOM seen."""
        limit = self.batch_tokens
        if self.batch_memory_bytes is not None:
            limit = min(limit, max(1, (self.batch_memory_bytes - self.head_bytes) // self.token_bytes))
        if self.oom_cap is not None:
            limit = min(limit, self.oom_cap)
        return limit

    def cut(self, items: list[T], cost: Callable[[list[T]], int]) -> list[list[T]]:
        """Consecutive runs of length-sorted items whose cost fits the batch token limit."""
        limit = self.token_limit()
        batches: list[list[T]] = []
        for item in items:
            if batches and cost([*batches[-1], item]) <= limit:
                batches[-1].append(item)
            else:
                batches.append([item])
        return batches

    def run(
        self,
        batches: list[list[T]],
        prepare: Callable[[list[T]], Prepared],
        run: Callable[[Prepared], torch.Tensor],
        cost: Callable[[list[T]], int],
        progress: Progress | None = None,
    ) -> list[tuple[list[T], torch.Tensor]]:
        """Run the batches in order; on CUDA the next one is prepared (and pinned) in a helper
        thread while the device works on the current one. `progress` hears each batch's scored
        positions (batches of windows)."""
        done: list[tuple[list[T], torch.Tensor]] = []

        def report(batch: list[T]) -> None:
            if progress is not None:
                progress(sum(w.end - w.score_from for w in batch if isinstance(w, Window)), 0)

        if self.device.type != "cuda":
            for batch in batches:
                done += self._run_splitting(batch, prepare, run, cost)
                report(batch)
            return done
        if self._prefetch is None:
            self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codelen-prepare")

        def pinned(batch: list[T]) -> Prepared:
            return prepare(batch).pinned()

        pending: Future[Prepared] | None = self._prefetch.submit(pinned, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            assert pending is not None
            prepared = pending.result()
            pending = self._prefetch.submit(pinned, batches[k + 1]) if k + 1 < len(batches) else None
            done += self._run_splitting(batch, pinned, run, cost, prepared)
            report(batch)
        return done

    def _run_splitting(
        self,
        batch: list[T],
        prepare: Callable[[list[T]], Prepared],
        run: Callable[[Prepared], torch.Tensor],
        cost: Callable[[list[T]], int],
        prepared: Prepared | None = None,
    ) -> list[tuple[list[T], torch.Tensor]]:
        """Run one batch; if the device runs out of memory, halve it (recursively) and form later
        batches no larger than half of the one that failed. One item that does not fit fails."""
        if prepared is None:
            prepared = prepare(batch)
        try:
            return [(batch, run(prepared))]
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
        # Outside the handler, so the traceback's frames (and their tensors) are already released.
        del prepared
        self.oom_splits += 1
        self.oom_cap = max(1, cost(batch) // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory on a batch of %d items (%d tokens): splitting", len(batch), cost(batch))
        half = len(batch) // 2
        return [
            *self._run_splitting(batch[:half], prepare, run, cost),
            *self._run_splitting(batch[half:], prepare, run, cost),
        ]
