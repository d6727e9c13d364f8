"""Batch-invariant matrix products for the CPU, so a code length never depends on its batch.

A CPU GEMM picks its kernel and blocking by the number of rows M: the same row multiplied inside
an 11-row and a 39-row product can differ in the last bits (measured on SmolLM2's projections).
Items batched differently (embedded vs distributed mode, one job vs another) would then get
different code lengths for the same text. Computing every product in tiles of exactly TILE rows
(zero-padded, as one batched matmul) gives each row the same arithmetic wherever it sits; the rest
of the model is row-wise or per window, so whole code lengths become bit-for-bit reproducible.
Cost: at most TILE - 1 padded rows per product.
"""

from __future__ import annotations

import torch
from torch import nn

TILE = 16  # as fast as 64 for long inputs on the CPU (measured), less padding for short ones


def tiled_matmul(x: torch.Tensor, weight_t: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """x (..., K) @ weight_t (K, N), computed in row tiles of exactly `tile` rows: the whole tiles
    as one batched product over a view (no copy), the last partial tile zero-padded."""
    rows = x.reshape(-1, x.shape[-1])
    m, k = rows.shape
    whole = m - m % tile
    parts = []
    if whole:
        parts.append(torch.matmul(rows[:whole].view(-1, tile, k), weight_t).reshape(whole, -1))
    if whole < m:
        last = rows.new_zeros(tile, k)
        last[: m - whole] = rows[whole:]
        parts.append((last @ weight_t)[: m - whole])
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(*x.shape[:-1], weight_t.shape[-1])


class TiledLinear(nn.Module):
    """An nn.Linear computed with `tiled_matmul` (same weights, shared, not copied)."""

    def __init__(self, linear: nn.Linear, tile: int = TILE) -> None:
        super().__init__()
        self.weight, self.bias, self.tile = linear.weight, linear.bias, tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tiled_matmul(x, self.weight.T, self.tile)
        return out if self.bias is None else out + self.bias


def make_batch_invariant(module: nn.Module, tile: int = TILE) -> int:
    """Replace every nn.Linear inside `module` by a TiledLinear; returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, TiledLinear(child, tile))
            replaced += 1
        else:
            replaced += make_batch_invariant(child, tile)
    return replaced
