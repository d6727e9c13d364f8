"""`adapt` mode's later optimizer steps of a block run only the adapted blocks, on what entered
them at the block's first step (the frozen blocks below give the same output at every step):
the bits and trained state against running the whole body at every step, and the time of each,
in one run (the two alternate, so both see the same machine).

    python benchmarks/adapt_steps.py --bytes 20000 --threads 2 [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditioning import DATA, conditions, text_stream  # noqa: E402

from codelen.datasets import RECORD_SEPARATOR  # noqa: E402
from codelen.settings import Settings  # noqa: E402
from models.conditioning import conditioned  # noqa: E402
from models.memory import sequence_digest  # noqa: E402
from models.protocol import Segment  # noqa: E402
from models.registry import Registry  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = Registry(Settings(models=args.model)).get(args.model)
    text = RECORD_SEPARATOR.join(text_stream(args, args.bytes))
    tokens = lm.encode(text)
    conditions(args, f" · X {len(text.encode())} bytes, {len(tokens)} tokens, coded alone (C(X), prequential)")
    results: dict[str, list] = {"short cut": [], "whole body": []}
    for _ in range(args.repeats):
        for name in results:
            compressor = conditioned(lm, "adapt", 0, 1 << 30)  # a new cache: every run codes X
            compressor._reuse = None if name == "short cut" else False
            started = time.perf_counter()
            (bits,) = compressor.score([Segment((), tokens)])
            seconds = time.perf_counter() - started
            results[name].append((bits.target_bits, seconds, compressor.cache.get(sequence_digest(tokens))))
            print(f"{name:10s}: C(X) {bits.target_bits:.3f} bits in {seconds:.1f} s "
                  f"({len(tokens) / seconds:.0f} tokens/s)", flush=True)  # fmt: skip
    (short, *_), (whole, *_) = results["short cut"], results["whole body"]
    states = [state for runs in results.values() for _, _, state in runs]
    same_state = all(torch.equal(a, b) for s in states[1:] for a, b in zip(states[0].params, s.params, strict=True))
    same_bits = len({bits for runs in results.values() for bits, _, _ in runs}) == 1
    fastest = {name: min(s for _, s, _ in runs) for name, runs in results.items()}
    print(
        f"same bits in every run: {same_bits} ({short[0] - whole[0]:+.6f}); same trained state: {same_state}; "
        f"fastest run: short cut {fastest['short cut']:.1f} s, whole body {fastest['whole body']:.1f} s, "
        f"{fastest['whole body'] / fastest['short cut']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
