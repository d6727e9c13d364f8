"""How much a bag of X's tokens could add to the LM on the class-similarity matrix (an upper bound
for the idea, not a mode): Y's tokens coded by the mixture (1 − λ) p_LM + λ u, where p_LM is the
model's prediction from Y alone and u the add-½ unigram distribution of X's tokens and Y's tokens
before the current one (for C(Y): Y's earlier tokens only). λ is swept: the best λ in hindsight
bounds every fixed λ.

    python benchmarks/similarity_cache_bound.py                                   # AG News, X = 200, Y = 20
    python benchmarks/similarity_cache_bound.py --data ../shared/data/r8/r8_train.txt --n-x 30 --n-y 8

Same classes, texts and margins as `conditioning.py similarity` (same --seed)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditioning import DATA, class_datasets, conditions  # noqa: E402

from codelen.settings import Settings  # noqa: E402
from models.registry import Registry  # noqa: E402

ALPHA = 0.5


def cache_bits(tokens: list[int], lm_bits: list[float], prior: list[int], lam: float, vocab: int) -> float:
    counts = torch.zeros(vocab, dtype=torch.float64)
    if prior:
        counts.index_add_(0, torch.tensor(prior), torch.ones(len(prior), dtype=torch.float64))
    total, bits = float(len(prior)), 0.0
    for t, b in zip(tokens, lm_bits, strict=True):
        u = (float(counts[t]) + ALPHA) / (total + ALPHA * vocab)
        bits -= math.log2((1 - lam) * 2.0**-b + lam * u)
        counts[t] += 1
        total += 1
    return bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-x", type=int, default=200)
    ap.add_argument("--n-y", type=int, default=20)
    ap.add_argument("--lambdas", default="0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes, xs, ys = class_datasets(args)
    conditions(args, f" · classes {classes}, X = {args.n_x} texts, Y = {args.n_y} texts · unigram cache bound")
    lm = Registry(Settings()).get(args.model, "context")
    vocab = int(lm.head_weight.shape[0])
    y_tokens = {c: list(lm.encode(ys[c])) for c in classes}
    x_tokens = {c: list(lm.encode(xs[c])) for c in classes}
    lm_bits = {c: lm.token_bits([y_tokens[c]])[0].tolist() for c in classes}
    for lam in (float(v) for v in args.lambdas.split(",")):
        margins = []
        for cy in classes:
            alone = cache_bits(y_tokens[cy], lm_bits[cy], [], lam, vocab)
            ratio = {cx: cache_bits(y_tokens[cy], lm_bits[cy], x_tokens[cx], lam, vocab) / alone for cx in classes}
            margins.append(min(v for cx, v in ratio.items() if cx != cy) - ratio[cy])
            cells = " ".join(f"{ratio[cx]:.3f}" for cx in classes)
            print(f"  λ={lam:<5} Y={cy}: {cells}   margin {margins[-1]:+.3f}")
        first = sum(m > 0 for m in margins)
        print(f"λ={lam}: own class first in {first} of 4 rows, mean margin {sum(margins) / len(margins):+.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
