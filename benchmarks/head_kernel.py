"""The vocabulary head alone on CUDA: bits of N positions' targets, three ways, in one run.

    python benchmarks/head_kernel.py [--rows 32768] [--json]

For the head shapes of SmolLM2-135M (49,152 x 576) and Gemma-3-270M (262,144 x 640), bf16 hidden
states and weight, random values (never zeros):
- chunked_fp32: the fp32 weight, fp32 matmul into 64 MiB chunks of logits, then logsumexp minus
  the target logit (the engine's path where torch has no mixed-precision matmul);
- chunked_mixed: bf16 operands multiplied into fp32 logits (torch.mm out_dtype), same chunks;
- fused: models/fused_head.py, one Triton kernel, logits never in memory.
Median of 20 timed runs (CUDA events) after warm-up; error: max |bits - fp64 reference| over
the first 2,048 rows; TFLOP/s counts the 2 x rows x vocab x width of the matmul.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import fused_head  # noqa: E402
from models.head import HEAD_CHUNK_ELEMENTS, chunk_bits  # noqa: E402

SHAPES = {"smollm2-135m": (49152, 576), "gemma3-270m": (262144, 640)}


def chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mixed: bool) -> torch.Tensor:
    rows = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(targets), rows):
        h = hidden[i : i + rows]
        logits = torch.mm(h, weight.T, out_dtype=torch.float32) if mixed else h.float() @ weight.T
        out[i : i + rows] = chunk_bits(logits, targets[i : i + rows], None)
    return out


def median_ms(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def has_mixed_mm() -> bool:
    a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def measure(vocab: int, width: int, rows: int, gen: torch.Generator) -> dict[str, dict[str, float]]:
    hidden = (torch.randn(rows, width, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    weight = (torch.randn(vocab, width, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    check = slice(0, 2048)
    ref = fused_head.reference_head_bits(hidden[check].double(), weight.double(), targets[check]).float()
    weight32 = weight.float()
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "chunked_fp32": lambda: chunked(hidden, weight32, targets, mixed=False),
    }
    if has_mixed_mm():
        ways["chunked_mixed"] = lambda: chunked(hidden, weight, targets, mixed=True)
    if fused_head.available(weight):
        ways["fused"] = lambda: fused_head.head_bits(hidden, weight, targets)
    flop = 2 * rows * vocab * width
    row: dict[str, dict[str, float]] = {}
    for name, fn in ways.items():
        ms = median_ms(fn)
        err = float((fn()[check] - ref).abs().max())
        row[name] = {"ms": ms, "positions_per_s": rows / ms * 1e3, "tflops": flop / ms / 1e9, "max_abs_err": err}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results: dict[str, object] = {
        "conditions": {
            "device_name": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "rows": args.rows,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
    }
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model, (vocab, width) in SHAPES.items():
        results[model] = measure(vocab, width, args.rows, gen)
        torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        c = results["conditions"]
        print(f"vocabulary head, {c['rows']} positions, {c['device_name']}, torch {c['torch']}, {c['date']}")
        print("| model | way | ms | positions/s | TFLOP/s | max abs err (bits) |\n|---|---|---:|---:|---:|---:|")
        for model in SHAPES:
            for name, r in results[model].items():
                print(
                    f"| {model} | {name} | {r['ms']:.2f} | {r['positions_per_s']:,.0f} | {r['tflops']:.0f} "
                    f"| {r['max_abs_err']:.1e} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
