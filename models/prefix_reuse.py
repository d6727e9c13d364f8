"""Prefix reuse: run a shared prefix X once and code every target after it from X's state.

C(Y|X) for one X and many Y (a matrix row, kNN against one text, a class context in
classification) needs [BOS] + X only once: its key/value state (`models.prefix_cache`) serves every
target that fits one window with it, and an LRU bounded by bytes keeps it for later calls. A C(X)
asked in the same call comes from that pass too.
- On the CPU (and wherever `packed_prefix` is off) each prefix continues its targets in padded
  rows from its HF cache (`prefix_state`, `continue_padded`); in deterministic mode one target
  per forward, so its bits never depend on its neighbours.
- On CUDA (`packed_prefix`) the prefixes run in packed batches (`packed_prefix_states`) and the
  targets after all of them share packed batches, each window gathering its prefix's keys and
  values in front of its own (`continue_packed`, `models.packing.PrefixRows`).
Batches go through the LM's `Batcher` (`models.batching`), like plain windows.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from models.batching import Prepared, Window, kv_bytes_per_token, packed_cost, prepare_windows, totals_in_order
from models.packing import PrefixRows, packed_attention
from models.prefix_cache import PackedPrefixState, PrefixState
from models.protocol import Segment, SegmentBits

if TYPE_CHECKING:
    from models.lm import LMCompressor

# Deterministic mode continues from a prefix state only where len(prefix) >= this × len(target).
DETERMINISTIC_REUSE_RATIO = 2


def score_with_prefix_states(lm: LMCompressor, segments: list[Segment], out: list[SegmentBits | None]) -> None:
    """Fill `out` for the segments a prefix state serves: targets after a prefix shared in this
    call (or kept from an earlier one) that fit one window with it, and C(X) of such a prefix."""
    context = lm.window.context_tokens
    after: dict[tuple[int, ...], list[int]] = defaultdict(list)  # prefix -> segments (X, Y)
    alone: dict[tuple[int, ...], list[int]] = defaultdict(list)  # X -> segments ((), X)
    for i, s in enumerate(segments):
        fits = s.prefix and s.target and 1 + len(s.prefix) + len(s.target) <= context
        # Deterministic mode decides by the segment alone: continuing one target at a time
        # pays only where the prefix is long next to the target (class contexts, not pairs
        # of similar texts; measured with benchmarks/engine_throughput.py).
        if fits and (not lm.deterministic or len(s.prefix) >= DETERMINISTIC_REUSE_RATIO * len(s.target)):
            after[tuple(s.prefix)].append(i)
        elif not s.prefix and s.target and 1 + len(s.target) <= context:
            alone[tuple(s.target)].append(i)
    groups = [
        (prefix, indices)
        for prefix, indices in after.items()
        if lm.deterministic or len(indices) + (prefix in alone) >= 2 or prefix in lm.prefix_cache
    ]  # a prefix used once: the plain path costs the same and batches better
    if lm.packed_prefix and lm.packing:
        _score_packed_prefixes(lm, groups, segments, out)
    else:
        for prefix, indices in groups:
            state = lm.prefix_cache.get(prefix)
            if not isinstance(state, PrefixState):
                state = prefix_state(lm, prefix)
            target_bits = continue_padded(lm, state, [tuple(segments[i].target) for i in indices])
            for i, bits in zip(indices, target_bits, strict=True):
                out[i] = SegmentBits(prefix_bits=state.prefix_bits, target_bits=bits)
            lm.prefix_cache.put(prefix, state)
    for prefix, indices in groups:
        prefix_bits = out[indices[0]].prefix_bits  # type: ignore[union-attr]
        for i in alone.pop(prefix, []):
            out[i] = SegmentBits(prefix_bits=0.0, target_bits=prefix_bits)
    for target, indices in alone.items():
        state = lm.prefix_cache.peek(target)
        if state is not None:
            for i in indices:
                out[i] = SegmentBits(prefix_bits=0.0, target_bits=state.prefix_bits)


# -- one prefix at a time, from its HF cache ---------------------------------------------------


def prefix_state(lm: LMCompressor, prefix: tuple[int, ...]) -> PrefixState:
    """Run [BOS] + prefix once; its cache, last hidden state and C(prefix)."""
    ids = lm.with_start(prefix)[None].to(lm.device)
    result = lm.body(input_ids=ids, use_cache=True)
    hidden = result.last_hidden_state[0]
    bits = float(lm.head.bits(hidden[:-1], ids[0, 1:]).to("cpu", torch.float64).sum())
    return PrefixState.from_forward(result.past_key_values, hidden[-1:], bits, ids.shape[1])


def continue_padded(lm: LMCompressor, state: PrefixState, targets: list[tuple[int, ...]]) -> list[float]:
    """C(target | prefix) of each target, continuing from the prefix state in padded batches."""
    for target in targets:
        lm.check_ids(target)
    order = sorted(range(len(targets)), key=lambda i: len(targets[i]), reverse=True)
    sorted_targets = [targets[i] for i in order]
    kv_ratio = lm.kv_per_token

    def cost(batch: list[tuple[int, ...]]) -> int:
        # Each row also holds its copy of the prefix's keys and values through the forward.
        return len(batch) * (len(batch[0]) + math.ceil(state.n_positions * kv_ratio))

    def prepare(batch: list[tuple[int, ...]]) -> Prepared:
        width = len(batch[0])
        ids = torch.full((len(batch), width), lm.start_token_id, dtype=torch.long)
        index = []
        for r, target in enumerate(batch):
            ids[r, : len(target)] = torch.tensor(target, dtype=torch.long)
            # Token j is predicted by position j - 1 of its row; token 0 by the prefix's last
            # position, entry 0 of [last_hidden, flattened hidden].
            after_first = 1 + r * width + torch.arange(len(target) - 1)
            index.append(torch.cat([torch.zeros(1, dtype=torch.long), after_first]))
        targets_flat = torch.cat([torch.tensor(t, dtype=torch.long) for t in batch])
        return Prepared(ids=ids, index=torch.cat(index), targets=targets_flat)

    def run(prepared: Prepared) -> torch.Tensor:
        ids = lm.to_device(prepared.ids)
        rows, width = ids.shape
        positions = torch.arange(state.n_positions, state.n_positions + width, device=lm.device)
        hidden = lm.body(
            input_ids=ids,
            position_ids=positions.expand(rows, width),
            past_key_values=state.expanded_cache(rows),
            use_cache=True,
        ).last_hidden_state
        flat = torch.cat([state.last_hidden, hidden.reshape(-1, hidden.shape[-1])])
        return lm.head.bits(flat[lm.to_device(prepared.index)], lm.to_device(prepared.targets))

    # Deterministic: one target per forward, so its bits never depend on its neighbours' lengths.
    batches = [[t] for t in sorted_targets] if lm.deterministic else lm.batcher.cut(sorted_targets, cost)
    done = lm.batcher.run(batches, prepare, run, cost)
    return totals_in_order(done, [len(t) for t in sorted_targets], order)


# -- many prefixes at once, in packed batches --------------------------------------------------


def _score_packed_prefixes(
    lm: LMCompressor,
    groups: list[tuple[tuple[int, ...], list[int]]],
    segments: list[Segment],
    out: list[SegmentBits | None],
) -> None:
    """Prefix states for all groups (packed prefix passes for those not kept), then every
    target in packed batches; in parts whose states fit the prefix cache's budget (at least
    256 MiB), so a call with thousands of prefixes never holds them all."""
    per_token = kv_bytes_per_token(lm.model)
    budget = max(lm.prefix_cache.max_bytes, 256 << 20)
    part: list[tuple[tuple[int, ...], list[int]]] = []
    size = 0
    for k, group in enumerate(groups):
        part.append(group)
        size += (1 + len(group[0])) * per_token
        if size < budget and k + 1 < len(groups):
            continue
        states: dict[tuple[int, ...], PackedPrefixState] = {}
        missing = []
        for prefix, _ in part:
            state = lm.prefix_cache.get(prefix)
            if isinstance(state, PackedPrefixState):
                states[prefix] = state
            else:
                missing.append(prefix)
        states.update(zip(missing, packed_prefix_states(lm, missing), strict=True))
        items = [(states[prefix], tuple(segments[i].target)) for prefix, indices in part for i in indices]
        bits = iter(continue_packed(lm, items))
        for prefix, indices in part:
            for i in indices:
                out[i] = SegmentBits(prefix_bits=states[prefix].prefix_bits, target_bits=next(bits))
            lm.prefix_cache.put(prefix, states[prefix])
        part, size = [], 0


def packed_prefix_states(lm: LMCompressor, prefixes: list[tuple[int, ...]]) -> list[PackedPrefixState]:
    """Run [BOS] + each prefix in packed batches, keeping every layer's keys and values."""
    full = [lm.with_start(p) for p in prefixes]
    windows = sorted(
        (Window(seq=i, start=0, end=len(t), score_from=1) for i, t in enumerate(full)),
        key=lambda w: w.length,
        reverse=True,
    )
    states: list[PackedPrefixState | None] = [None] * len(prefixes)
    layers = int(lm.model.config.num_hidden_layers)

    def run(prepared: Prepared) -> torch.Tensor:
        assert prepared.bounds is not None
        capture: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with packed_attention(lm.model):  # eager: the capture is a side effect
            hidden = lm.body(**lm.packed_kwargs(prepared), codelen_capture=capture).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        bits = lm.head.bits(flat[lm.to_device(prepared.index)], lm.to_device(prepared.targets))
        assert prepared.items is not None
        for r, w in enumerate(prepared.items):
            a, b = prepared.bounds[r], prepared.bounds[r + 1]
            # Own, contiguous copies: a slice of the batch's (transposed) keys would keep the
            # whole batch alive, and its strides would differ from batch to batch, which makes
            # the compiled body recompile (a minute each for Gemma on an H100).
            states[w.seq] = PackedPrefixState(
                keys=[capture[layer][0][a:b].clone(memory_format=torch.contiguous_format) for layer in range(layers)],
                values=[capture[layer][1][a:b].clone(memory_format=torch.contiguous_format) for layer in range(layers)],
                last_hidden=flat[b - 1 : b].clone(),
                prefix_bits=0.0,  # filled below, after one transfer
                n_positions=b - a,
            )
        return bits

    def prepare(batch: list[Window]) -> Prepared:
        return dataclasses.replace(prepare_windows(batch, full, True, lm.start_token_id), items=batch)

    done = lm.batcher.run(lm.batcher.cut(windows, packed_cost), prepare, run, packed_cost)
    if done:
        bits = torch.cat([b for _, b in done]).to("cpu", torch.float64)
        offset = 0
        for batch, _ in done:
            for w in batch:
                n = w.end - w.score_from
                state = states[w.seq]
                assert state is not None
                state.prefix_bits = float(bits[offset : offset + n].sum())
                offset += n
    return states  # type: ignore[return-value]


def continue_packed(lm: LMCompressor, items: list[tuple[PackedPrefixState, tuple[int, ...]]]) -> list[float]:
    """C(target | prefix) of each (prefix state, target), all in packed batches: each window
    is a target, attending to its prefix's keys and values and then causally to itself."""
    for _, target in items:
        lm.check_ids(target)
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]), reverse=True)
    ratio = lm.kv_per_token
    on_cuda = lm.device.type == "cuda"

    def cost(batch: list[tuple[PackedPrefixState, tuple[int, ...]]]) -> int:
        # Each window also holds its gathered copy of the prefix's keys and values per layer.
        return sum(len(t) + math.ceil(state.n_positions * ratio) for state, t in batch)

    def prepare(batch: list[tuple[PackedPrefixState, tuple[int, ...]]]) -> Prepared:
        bank: dict[int, int] = {}  # id(state) -> its number in the bank
        states: list[PackedPrefixState] = []
        starts: list[int] = []  # first bank row of each state
        rows = 0
        for state, _ in batch:
            if id(state) not in bank:
                bank[id(state)] = len(states)
                states.append(state)
                starts.append(rows)
                rows += state.n_positions
        lengths = [len(t) for _, t in batch]
        bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        bounds_k = [
            0,
            *torch.tensor([s.n_positions + n for (s, _), n in zip(batch, lengths, strict=True)]).cumsum(0).tolist(),
        ]
        kv_index, index = [], []
        for (state, _), n, q0 in zip(batch, lengths, bounds, strict=False):
            first = starts[bank[id(state)]]
            kv_index += [torch.arange(first, first + state.n_positions), rows + q0 + torch.arange(n)]
            # Token 0 is predicted by the prefix's last hidden state (entry bank number of
            # [last hidden of each state; the batch's flattened hidden states]), token j by row j - 1.
            index += [torch.tensor([bank[id(state)]]), len(states) + q0 + torch.arange(n - 1)]
        return Prepared(
            ids=torch.tensor([tok for _, t in batch for tok in t], dtype=torch.long)[None],
            index=torch.cat(index),
            targets=torch.tensor([tok for _, t in batch for tok in t], dtype=torch.long),
            positions=torch.cat(
                [torch.arange(s.n_positions, s.n_positions + n) for (s, _), n in zip(batch, lengths, strict=True)]
            )[None],
            cu_seq_lens=torch.tensor(bounds, dtype=torch.int32),
            bounds=bounds,
            states=states,
            kv_index=torch.cat(kv_index),
            bounds_k=bounds_k,
        )

    def run(prepared: Prepared) -> torch.Tensor:
        assert prepared.states is not None and prepared.bounds is not None and prepared.bounds_k is not None
        states = prepared.states
        layers = range(len(states[0].keys))
        one = len(states) == 1
        rows = PrefixRows(
            keys=[states[0].keys[i] if one else torch.cat([s.keys[i] for s in states]) for i in layers],
            values=[states[0].values[i] if one else torch.cat([s.values[i] for s in states]) for i in layers],
            index=lm.to_device(prepared.kv_index),  # type: ignore[arg-type]
            cu_seq_lens_k=torch.tensor(prepared.bounds_k, dtype=torch.int32).to(lm.device),
            max_length_k=max(b - a for a, b in zip(prepared.bounds_k[:-1], prepared.bounds_k[1:], strict=True)),
            # A host list that changes per batch is not handed to the compiled body on CUDA.
            bounds_k=prepared.bounds_k if not on_cuda else None,
        )
        kwargs = lm.packed_kwargs(prepared)
        kwargs["codelen_prefix"] = rows
        with packed_attention(lm.model):
            hidden = lm.packed_body(kwargs)
        last = torch.cat([s.last_hidden for s in states])
        flat = torch.cat([last, hidden.reshape(-1, hidden.shape[-1])])
        return lm.head.bits(flat[lm.to_device(prepared.index)], lm.to_device(prepared.targets))

    sorted_items = [items[i] for i in order]
    done = lm.batcher.run(lm.batcher.cut(sorted_items, cost), prepare, run, cost)
    return totals_in_order(done, [len(t) for _, t in sorted_items], order)
