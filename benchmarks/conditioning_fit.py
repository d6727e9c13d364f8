"""Fit the parameters of `memory` mode (models/memory.py) for one model, on data that is not the
check's: by default R8's training texts (Reuters, lower-cased, no punctuation), never AG News.

    python benchmarks/conditioning_fit.py --model smollm2-135m --data ../shared/data/r8/r8_train.txt

Cases (all coded as the service codes them, through `MemoryCompressor.neighbours`):
- containment: Y = 10 texts; X = 75 texts, then Y's texts, then 75 more; and X without Y's texts
  (10 others in their place): C(Y|X), and X's own tokens (repetitions inside X);
- similarity: the 4 largest classes as datasets, X = 60 texts of a class, Y = 8 other texts of a
  class: C(Y|X) for all 16 pairs, and each X's own tokens.

The rule: k = 16 and λ_max = 0.9999 fixed; (a, b, c, T) minimise the mean over cases of
log(C_memory / C_context) — each case's relative saving counts the same, whatever its size. Adam,
800 steps, from (3, -1, 0.5, T = 5). Prints the parameters for `models/conditioning.py` and every
case's ratio; the neighbours are computed once, so refitting is seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classify.data import load_examples  # noqa: E402
from codelen.datasets import RECORD_SEPARATOR  # noqa: E402
from models.lm import load_lm_compressor  # noqa: E402
from models.memory import Memory, MemoryCompressor, MemoryParams, Neighbours, mixture_bits  # noqa: E402
from models.protocol import Conditioning  # noqa: E402


def cases_for(compressor: MemoryCompressor, texts: dict[str, list[str]], seed: int) -> dict[str, tuple]:
    """name -> (neighbours of the coded tokens, run before them, C_context of those tokens)."""
    lm = compressor.lm
    rng = random.Random(seed)
    pool = list(dict.fromkeys(t for ts in texts.values() for t in ts))
    rng.shuffle(pool)
    y, a, b, other = pool[:10], pool[10:85], pool[85:160], pool[160:170]
    classes = sorted(texts, key=lambda c: -len(texts[c]))[:4]
    xs, ys = {"copy": a + y + b, "absent": a + other + b}, {"y": y}
    for c in classes:
        ts = list(dict.fromkeys(texts[c]))
        rng.shuffle(ts)
        xs[f"class {c}"], ys[c] = ts[:60], ts[60:68]
    pairs = [("copy", "y"), ("absent", "y")] + [(f"class {ci}", cj) for ci in classes for cj in classes]
    encoded = {n: list(lm.encode(RECORD_SEPARATOR.join(t))) for n, t in {**xs, **ys}.items()}
    out: dict[str, tuple] = {}
    for name in xs:
        x = encoded[name]
        own = compressor.neighbours(x, None)
        out[f"{name}: X itself"] = (own, 0, float(own.lm_bits.sum()))
        hits = own.has_memory & (own.tokens[:, 0] == own.targets)
        memory = Memory(own.keys, own.norms, own.targets, torch.zeros(len(x), dtype=torch.float64), hits)
        for xn, yn in pairs:
            if xn == name:
                after = compressor.neighbours([*x, *encoded[yn]], memory)
                out[f"{name}: Y={yn}"] = (after, memory.run_at_end(), float(after.lm_bits.sum()))
    return out


def total_bits(found: Neighbours, run: int, params: object) -> torch.Tensor:
    bits, _ = mixture_bits(found.lm_bits, found.targets, found.distances, found.tokens, found.has_memory, run, params)
    return bits.sum()


def fit(cases: dict[str, tuple], k: int, steps: int = 800) -> dict[str, float]:
    values = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (3.0, -1.0, 0.5, math.log(5.0))]
    optimizer = torch.optim.Adam(values, lr=0.05)
    for _ in range(steps):
        a, b, c, log_t = values
        params = SimpleNamespace(bias=a, distance=b, run=c, temperature=torch.exp(log_t), max_weight=0.9999, k=k)
        loss = sum(torch.log(total_bits(f, r, params) / ctx) for f, r, ctx in cases.values()) / len(cases)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    a, b, c, log_t = (float(v) for v in values)
    return {"bias": a, "distance": b, "run": c, "temperature": math.exp(log_t), "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/r8/r8_train.txt"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.time()
    lm = load_lm_compressor(args.model)
    k = 16
    # The mode as this run fits it (whatever parameters the model ships with, if any).
    lm.info = dataclasses.replace(
        lm.info, modes=(*(m for m in lm.info.modes if m.mode != "memory"), Conditioning("memory", (), "fit"))
    )
    compressor = MemoryCompressor(lm, MemoryParams(k=k, temperature=1.0, bias=0.0, distance=0.0, run=0.0), 0)
    texts: dict[str, list[str]] = {}
    for e in load_examples(Path(args.data)):
        texts.setdefault(e.label, []).append(e.text)
    print(f"# {args.model} on {args.data}, seed {args.seed}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    cases = cases_for(compressor, texts, args.seed)
    print(
        f"# neighbours of {sum(len(f.targets) for f, _, _ in cases.values())} tokens in {time.time() - started:.0f} s"
    )
    result = fit(cases, k)
    print(
        f"MemoryParams(k={k}, temperature={result['temperature']:.3g}, bias={result['bias']:.3g}, "
        f"distance={result['distance']:.3g}, run={result['run']:.3g})   mean log ratio {result['loss']:.4f}"
    )
    params = SimpleNamespace(**{n: result[n] for n in ("bias", "distance", "run", "temperature")}, max_weight=0.9999)
    for name, (found, run, ctx) in cases.items():
        mem = float(total_bits(found, run, params))
        print(f"{name:24s} context {ctx:10.0f} bits   memory {mem:10.0f}   ratio {mem / ctx:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
