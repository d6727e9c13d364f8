"""How `memory` mode scales to large Xs: two measurements behind its fixed parameters.

`precision`: what storing the keys in fp16 instead of fp32 changes. C(X) and C(Y|X) of the
containment cases (Y's records in the middle of X, and absent), coded once with each key precision
from the same forward passes (the model's states are computed once and reused; only the rounding
of the states the memory keeps differs).

`horizon`: the cost of the kNN search per token once X is longer than the horizon, against the
model's forward pass in the same run: what `horizon` (the kNN memory's reach) must be for
`memory` to keep a given share of `context` mode's token rate at any size of X. One step of
`memory` mode: the model's states for `--windows` windows of the data (the forward pass that
`context` mode also makes), then the exact search of those states among `horizon` keys (every
token past the first `horizon` pays exactly that). The keys are random: the cost of an exact
search does not depend on their values.

    python benchmarks/memory_scaling.py precision [--data ../shared/data/sms_spam/sms_spam.tsv] [--x-bytes 40000]
    python benchmarks/memory_scaling.py horizon --threads 2 [--horizons 65536,131072,262144,524288]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditioning import DATA, conditions, containment_texts, text_stream  # noqa: E402

import models.memory as memory  # noqa: E402
from codelen.datasets import RECORD_SEPARATOR  # noqa: E402
from codelen.settings import Settings  # noqa: E402
from models.conditioning import MEMORY, conditioned  # noqa: E402
from models.lm import LMCompressor  # noqa: E402
from models.protocol import Segment  # noqa: E402
from models.registry import Registry  # noqa: E402


def precision(lm: LMCompressor, args: argparse.Namespace) -> None:
    x_copy, x_absent, y_text = containment_texts(args)
    conditions(args, f" · X {len(x_copy.encode())} bytes, Y {len(y_text.encode())} bytes")
    computed: dict[tuple, list] = {}
    forward = lm.token_states

    def reused(sequences, first):  # the same call gives the same states: compute them once
        key = (tuple(tuple(s) for s in sequences), tuple(first))
        if key not in computed:
            computed[key] = forward(sequences, first=first)
        return computed[key]

    lm.token_states = reused  # type: ignore[method-assign]
    results = {}
    for dtype in (torch.float32, torch.float16):
        memory.KEY_DTYPE = dtype
        compressor = conditioned(lm, "memory", 1 << 30, 0)
        for label, x in (("copy", x_copy), ("absent", x_absent)):
            sx, sy = compressor.encode(x), compressor.encode(y_text)
            started = time.perf_counter()
            joint, alone = compressor.score([Segment(sx, sy), Segment((), sy)])
            results[dtype, label] = joint
            print(
                f"keys {str(dtype).removeprefix('torch.'):8s} Y {label:6s}: C(X) {joint.prefix_bits:.3f}  "
                f"C(Y|X) {joint.target_bits:.3f}  C(Y) {alone.target_bits:.3f}  "
                f"ratio {joint.target_bits / alone.target_bits:.4f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    for label in ("copy", "absent"):
        a, b = results[torch.float32, label], results[torch.float16, label]
        print(
            f"fp16 - fp32, Y {label}: C(X) {b.prefix_bits - a.prefix_bits:+.4f} bits, "
            f"C(Y|X) {b.target_bits - a.target_bits:+.4f} bits"
        )


def horizon(lm: LMCompressor, args: argparse.Namespace) -> None:
    context, stride = lm.window.context_tokens, lm.window.stride
    n = context + (args.windows - 1) * stride  # the tokens of `windows` sliding windows
    tokens = list(lm.encode(RECORD_SEPARATOR.join(text_stream(args, 6 * n))))[: n + context]
    conditions(args, f" · {args.windows} windows of {context} tokens, stride {stride}")
    started = time.perf_counter()
    ((_, states),) = lm.token_states([tokens[: n + context]], first=[context])  # the step after a first window
    forward = time.perf_counter() - started
    queries = states.to(memory.KEY_DTYPE).float()
    m = len(queries)
    print(f"forward pass: {m} tokens in {forward:.1f} s ({m / forward:.0f} tokens/s)")
    gen = torch.Generator().manual_seed(args.seed)
    for size in (int(h) for h in args.horizons.split(",")):
        keys = (torch.randn(size, queries.shape[1], generator=gen) * queries.std()).to(memory.KEY_DTYPE)
        norms = (keys.float() ** 2).sum(1)
        started = time.perf_counter()
        memory.search(queries, keys, norms, torch.full((m,), size), MEMORY[args.model].k)
        seconds = time.perf_counter() - started
        print(
            f"horizon {size:8d}: search {seconds:6.1f} s ({seconds / m * 1e3:.2f} ms a token); "
            f"forward's share of the step {forward / (forward + seconds):.0%}",
            flush=True,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("precision", "horizon"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x-bytes", type=int, default=40_000, help="precision: the containment X's size")
    ap.add_argument("--windows", type=int, default=8, help="horizon: windows per step (as MemoryCompressor)")
    ap.add_argument("--horizons", default="65536,131072,262144,524288")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = Registry(Settings(models=args.model)).get(args.model)
    {"precision": precision, "horizon": horizon}[args.what](lm, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
