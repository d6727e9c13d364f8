"""How much a cache of X's tokens could add to the LM on the class-similarity matrix (an upper
bound for the idea, not a mode): Y's tokens coded by the mixture (1 − λ) p_LM + λ u, where p_LM is
the model's prediction from Y alone and u a distribution counted from X's tokens and Y's tokens
before the current one (for C(Y): Y's earlier tokens only). λ is swept: the best λ in hindsight
bounds every fixed λ. The cache: `--order 0`, the add-½ unigram distribution; `--order K`, an
n-gram model of orders 0..K blended by Witten-Bell (each order's successor counts, backing off
to the order below by the number of distinct successors seen; below order 0, uniform): the
phrases a class repeats, which a general-purpose compressor finds as byte strings.

    python benchmarks/similarity_cache_bound.py                                   # AG News, X = 200, Y = 20
    python benchmarks/similarity_cache_bound.py --data ../shared/data/r8/r8_train.txt --n-x 30 --n-y 8
    python benchmarks/similarity_cache_bound.py --order 3                         # n-gram cache
    python benchmarks/similarity_cache_bound.py --order 3 --adaptive              # λ fitted in hindsight

`--adaptive`: instead of one λ, λ = σ(a_k + b · ln n), k the longest order whose context was seen
and n how often it was, with (a_0..a_K, b) fitted in hindsight to the total bits of every cell and
every C(Y) alone on the same data: an optimistic bound for any rule of that form.

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


class NGrams:
    """Witten-Bell blended n-gram counts of orders 0..order, updated token by token."""

    def __init__(self, order: int, vocab: int) -> None:
        self.order, self.vocab = order, vocab
        self.successors: dict[tuple[int, ...], dict[int, int]] = {}
        self.history: list[int] = []

    def add(self, token: int) -> None:
        for k in range(self.order + 1):
            if k <= len(self.history):
                h = tuple(self.history[len(self.history) - k :])
                counts = self.successors.setdefault(h, {})
                counts[token] = counts.get(token, 0) + 1
        self.history.append(token)

    def p(self, token: int) -> float:
        p = 1.0 / self.vocab
        for k in range(min(self.order, len(self.history)) + 1):
            counts = self.successors.get(tuple(self.history[len(self.history) - k :]))
            if not counts:
                break  # no longer context was seen either
            n, distinct = sum(counts.values()), len(counts)
            p = (counts.get(token, 0) + distinct * p) / (n + distinct)
        return p


def ngram_features(
    tokens: list[int], prior: list[int], vocab: int, order: int
) -> tuple[list[float], list[int], list[int]]:
    """Per token of `tokens` after `prior`: the cache's probability, the longest order whose context
    was seen, and how often it was."""
    cache = NGrams(order, vocab)
    for t in prior:
        cache.add(t)
    cache.history = []
    ps, ks, ns = [], [], []
    for t in tokens:
        ps.append(cache.p(t))
        k, n = 0, 0
        for j in range(min(order, len(cache.history)), -1, -1):
            counts = cache.successors.get(tuple(cache.history[len(cache.history) - j :]))
            if counts:
                k, n = j, sum(counts.values())
                break
        ks.append(k)
        ns.append(n)
        cache.add(t)
    return ps, ks, ns


def fit_adaptive(cells: dict, lm_bits: dict, order: int) -> tuple[dict, list[float]]:
    """Fit (a_0..a_K, b) to the total bits of all cells; returns each cell's bits and the fit."""
    feats = {
        key: (
            torch.tensor(lm_bits[key[0]], dtype=torch.float64),
            torch.tensor(ps, dtype=torch.float64),
            torch.tensor(ks),
            torch.tensor(ns, dtype=torch.float64),
        )
        for key, (ps, ks, ns) in cells.items()
    }
    a = torch.zeros(order + 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def bits_of(f) -> torch.Tensor:
        lm_b, p, k, n = f
        lam = torch.sigmoid(a[k] + b * torch.log1p(n))
        return -torch.log2((1 - lam) * torch.exp2(-lm_b) + lam * p).sum()

    opt = torch.optim.LBFGS([a, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(bits_of(f) for f in feats.values())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {key: float(bits_of(f)) for key, f in feats.items()}, [*a.tolist(), float(b)]


def ngram_bits(tokens: list[int], lm_bits: list[float], prior: list[int], lam: float, vocab: int, order: int) -> float:
    cache = NGrams(order, vocab)
    for t in prior:
        cache.add(t)
    cache.history = []  # Y starts a new context: X's last tokens are not Y's history
    bits = 0.0
    for t, b in zip(tokens, lm_bits, strict=True):
        bits -= math.log2((1 - lam) * 2.0**-b + lam * cache.p(t))
        cache.add(t)
    return bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default="", help="as in conditioning.py similarity")
    ap.add_argument("--n-x", type=int, default=200)
    ap.add_argument("--n-y", type=int, default=20)
    ap.add_argument("--lambdas", default="0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--order", type=int, default=0, help="0: the unigram cache; K > 0: n-grams of orders 0..K")
    ap.add_argument("--adaptive", action="store_true", help="λ by order and count, fitted in hindsight")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes, xs, ys = class_datasets(args)
    conditions(
        args,
        f" · classes {classes}, X = {args.n_x} texts, Y = {args.n_y} texts · "
        + (f"order-{args.order} n-gram cache bound" if args.order else "unigram cache bound"),
    )
    lm = Registry(Settings()).get(args.model, "context")
    vocab = int(lm.head_weight.shape[0])
    y_tokens = {c: list(lm.encode(ys[c])) for c in classes}
    x_tokens = {c: list(lm.encode(xs[c])) for c in classes}
    lm_bits = {c: lm.token_bits([y_tokens[c]])[0].tolist() for c in classes}

    def coded(cy: str, prior: list[int], lam: float) -> float:
        if args.order:
            return ngram_bits(y_tokens[cy], lm_bits[cy], prior, lam, vocab, args.order)
        return cache_bits(y_tokens[cy], lm_bits[cy], prior, lam, vocab)

    if args.adaptive:
        cells = {
            (cy, cx): ngram_features(y_tokens[cy], x_tokens[cx] if cx else [], vocab, args.order)
            for cy in classes
            for cx in [None, *classes]
        }
        got, fitted = fit_adaptive(cells, lm_bits, args.order)
        print(f"fitted a_0..a_{args.order}, b: " + " ".join(f"{v:.3f}" for v in fitted))
        margins, own = [], []
        for cy in classes:
            ratio = {cx: got[(cy, cx)] / got[(cy, None)] for cx in classes}
            margins.append(min(v for cx, v in ratio.items() if cx != cy) - ratio[cy])
            own.append(got[(cy, cy)] / sum(lm_bits[cy]))
            cells_text = " ".join(f"{ratio[cx]:.3f}" for cx in classes)
            print(
                f"  Y={cy}: {cells_text}   margin {margins[-1]:+.3f}   of the LM's C(Y): "
                f"C(Y) {got[(cy, None)] / sum(lm_bits[cy]):.3f}, C(Y|own X) {own[-1]:.3f}"
            )
        print(f"adaptive: mean margin {sum(margins) / 4:+.3f}; C(Y|own X) of the LM's C(Y), mean {sum(own) / 4:.3f}")
        return
    for lam in (float(v) for v in args.lambdas.split(",")):
        margins, alone_of_lm, own_of_lm = [], [], []
        for cy in classes:
            alone = coded(cy, [], lam)
            ratio = {cx: coded(cy, x_tokens[cx], lam) / alone for cx in classes}
            margins.append(min(v for cx, v in ratio.items() if cx != cy) - ratio[cy])
            # Is the mixture a better code than the LM alone? C(Y) and C(Y|own X) of the LM's C(Y).
            alone_of_lm.append(alone / sum(lm_bits[cy]))
            own_of_lm.append(ratio[cy] * alone_of_lm[-1])
            cells = " ".join(f"{ratio[cx]:.3f}" for cx in classes)
            print(
                f"  λ={lam:<5} Y={cy}: {cells}   margin {margins[-1]:+.3f}   of the LM's C(Y): "
                f"C(Y) {alone_of_lm[-1]:.3f}, C(Y|own X) {own_of_lm[-1]:.3f}"
            )
        first = sum(m > 0 for m in margins)
        print(
            f"λ={lam}: own class first in {first} of 4 rows, mean margin {sum(margins) / len(margins):+.3f}; "
            f"of the LM's C(Y), mean: C(Y) {sum(alone_of_lm) / 4:.3f}, C(Y|own X) {sum(own_of_lm) / 4:.3f}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
