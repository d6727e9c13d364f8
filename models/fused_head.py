"""-log2 softmax(hidden @ W^T)[target] in one CUDA kernel, without writing logits anywhere.

The vocabulary head is where a small LM spends its memory traffic: Gemma 3's 262,144-entry
vocabulary is 1 MiB of fp32 logits per position, written by a matmul and read back by a
logsumexp. This Triton kernel takes a block of rows of the (bf16/fp16) hidden states, walks the
vocabulary in tiles, multiplies each tile on the tensor cores with fp32 accumulation (the same
products as an fp32 matmul of the same bf16 values), and keeps an online logsumexp and the target's
logit per row: logits live only in registers. Output: bits per row, fp32.

`head_bits` is the entry point; `available()` says whether it can run here (CUDA + Triton).
`reference_head_bits` is the plain fp32 computation the tests compare against.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses the chunked torch path
    triton = None
    tl = None

_LN2 = math.log(2.0)


def available(weight: torch.Tensor) -> bool:
    return triton is not None and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)


def reference_head_bits(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """The same function in plain fp32 (full logits): the tests' reference."""
    logits = hidden.float() @ weight.float().T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    target = logits.gather(1, targets[:, None].long()).squeeze(1)
    return (torch.logsumexp(logits, dim=1) - target) / _LN2


if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh(x) = 1 - 2 / (exp(2x) + 1), stable at both ends in fp32.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.autotune(
        # 256-row blocks halve the weight's re-reads (it does not fit in L2: each block of rows
        # streams all of it, 2 x BLOCK_N FLOP per weight byte); autotuning skips a config that
        # does not fit the chip's registers or shared memory.
        configs=[
            triton.Config({"BLOCK_N": 256, "BLOCK_V": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        ],
        key=["K", "V"],
    )
    @triton.jit
    def _head_bits_kernel(
        h_ptr,
        w_ptr,
        t_ptr,
        out_ptr,
        N,
        V,
        K,
        stride_h,
        stride_w,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        target = tl.load(t_ptr + rows, mask=row_ok, other=0)
        running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_N], tl.float32)
        target_logit = tl.zeros([BLOCK_N], tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + ks
                k_ok = k < K
                a_mask = row_ok[:, None] & k_ok[None, :]
                b_mask = col_ok[None, :] & k_ok[:, None]
                a = tl.load(h_ptr + rows[:, None] * stride_h + k[None, :], mask=a_mask, other=0.0)
                b = tl.load(w_ptr + cols[None, :] * stride_w + k[:, None], mask=b_mask, other=0.0)
                acc = tl.dot(a, b, acc)
            if HAS_SOFTCAP:
                acc = _tanh(acc / softcap) * softcap
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(acc, axis=1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(acc - new_max[:, None]), axis=1)
            running_max = new_max
            target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], acc, 0.0), axis=1)
        bits = (running_max + tl.log(running_sum) - target_logit) * (1.0 / 0.6931471805599453)
        tl.store(out_ptr + rows, bits, mask=row_ok)


def head_bits(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Bits of each row's target: hidden (N, K) and weight (V, K) in one low-precision dtype on CUDA."""
    if not available(weight):
        raise RuntimeError("the fused head needs Triton and a bf16/fp16 weight on CUDA")
    hidden = hidden.to(weight.dtype).contiguous()
    weight = weight.contiguous()
    n, k = hidden.shape
    v = weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    _head_bits_kernel[grid](
        hidden,
        weight,
        targets.contiguous(),
        out,
        n,
        v,
        k,
        hidden.stride(0),
        weight.stride(0),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
    )
    return out
