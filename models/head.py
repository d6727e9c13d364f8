"""The vocabulary head: -log2 p(target) from final hidden states, without full-vocabulary logits.

Every code length is a sum of -log2 softmax(lm_head(hidden))[target]. Writing the logits of a
whole batch would cost 4 bytes × vocabulary per position (Gemma's 262k entries: 1 MiB of fp32 a
position), so they never all exist at once:
- on CUDA with a bf16/fp16 model and Triton, one kernel (`models.fused_head`) keeps them in
  registers (head matmul + online logsumexp);
- elsewhere they are computed in chunks of positions (`HEAD_CHUNK_ELEMENTS` fp32 values a chunk)
  and reduced with a logsumexp (`chunk_bits`), on fp32 operands, or on low-precision operands
  multiplied into fp32 where the device can (the same products as an fp32 matmul of those values);
  deterministic mode multiplies in fixed row tiles (`models.invariant`), so a position's bits
  never depend on its chunk.
A failure of the fused kernel or of the compiled softmax falls back to the chunked eager path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from models.fused_head import available as fused_head_available
from models.fused_head import head_bits as fused_head_bits
from models.invariant import tiled_matmul

log = logging.getLogger(__name__)

_LN2 = math.log(2.0)
# Elements of one chunk of fp32 logits (64 MiB): bounds memory of the vocabulary projection.
HEAD_CHUNK_ELEMENTS = 1 << 24


def chunk_bits(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """-log2 softmax(logits)[target] for one chunk of fp32 logits."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - target_logits) / _LN2


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


class Head:
    """A causal LM's output projection and softmax, as bits of targets.

    `fused`: the Triton kernel (default: where Triton and a bf16/fp16 model on CUDA are);
    `compile`: torch.compile the chunked softmax; `deterministic`: fixed-tile matrix products.
    """

    def __init__(
        self,
        head: torch.nn.Module,
        softcap: float | None,
        *,
        chunk_elements: int = HEAD_CHUNK_ELEMENTS,
        fused: bool | None = None,
        compile: bool = False,
        deterministic: bool = False,
    ) -> None:
        # The fused Triton head (models/fused_head.py) keeps the weight in its own dtype.
        if fused and not fused_head_available(head.weight):
            raise ValueError("fused_head needs Triton and a bf16/fp16 model on CUDA")
        self.fused = fused_head_available(head.weight) if fused is None else fused
        self.mixed = _mixed_precision_head(head.weight)
        # fp32 operands unless the fused head or the device multiplies low precision into fp32 (no
        # fp32 copy then: Gemma's tied head would cost 0.67 GB).
        self.weight_own = head.weight.detach()  # the model's parameter: no copy
        keep = self.fused or self.mixed
        self._weight = self.weight_own if keep else self.weight_own.to(torch.float32)
        self.bias = None if head.bias is None else head.bias.detach().to(torch.float32)
        self.softcap = softcap
        self.vocab = self._weight.shape[0]
        self.rows = max(1, chunk_elements // self.vocab)  # positions per chunk of logits
        self.deterministic = deterministic
        self._chunk_bits: Callable[..., torch.Tensor] = (
            torch.compile(chunk_bits, dynamic=True) if compile else chunk_bits
        )

    @property
    def hidden_size(self) -> int:
        return int(self._weight.shape[1])

    @property
    def chunk_bytes(self) -> int:
        """Device memory of one chunk of fp32 logits and its temporaries."""
        return self.rows * self.vocab * 4 * 3

    def bits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log2 softmax(lm_head(hidden))[target], in fp32: fused on CUDA (no logits in memory),
        else a chunk of positions at a time."""
        if self.fused and self.bias is None:
            try:
                return fused_head_bits(hidden, self.weight_own, targets, self.softcap)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a kernel failure must not fail the items: run the torch path
                log.warning("the fused head failed, using the chunked head: %s: %s", type(exc).__name__, exc)
                self.fused = False
        weight = self._weight
        if not self.mixed and weight.dtype != torch.float32:
            # Only after the fused head was turned off: an fp32 copy from then on.
            weight = self._weight = weight.to(torch.float32)
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), self.rows):
            rows = hidden[i : i + self.rows]
            if self.mixed:
                logits = torch.mm(rows, weight.T, out_dtype=torch.float32)
            elif self.deterministic:
                logits = tiled_matmul(rows.to(torch.float32), weight.T)
            else:
                logits = rows.to(torch.float32) @ weight.T
            if self.bias is not None:
                logits += self.bias
            out[i : i + self.rows] = self._softmax_bits(logits, targets[i : i + self.rows])
        return out

    def _softmax_bits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._chunk_bits is not chunk_bits:
            try:
                return self._chunk_bits(logits, targets, self.softcap)
            except Exception as exc:  # a compiler failure must not fail the items: run eager
                log.warning("torch.compile of the head failed, running eager: %s: %s", type(exc).__name__, exc)
                self._chunk_bits = chunk_bits
        return chunk_bits(logits, targets, self.softcap)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable fp32 logits of `hidden` under head `weight` (bias and soft-capping as the
        model's), for training; scoring uses `bits`."""
        logits = (hidden.to(weight.dtype) @ weight.T).to(torch.float32)
        if self.bias is not None:
            logits = logits + self.bias
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
