"""Fit the parameters of `memory` mode (models/memory.py) for one model, on data that is not the
check's: by default R8's training texts (Reuters, lower-cased, no punctuation), never AG News.

    python benchmarks/conditioning_fit.py --model smollm2-135m --data ../shared/data/r8/r8_train.txt

Cases (all coded as the service codes them, through `MemoryCompressor.neighbours`):
- containment: Y = 10 texts; X = 75 texts, then Y's texts, then 75 more; and X without Y's texts
  (10 others in their place): C(Y|X), and X's own tokens (repetitions inside X);
- similarity: the 4 largest classes as datasets, X = 60 texts of a class, Y = 8 other texts of a
  class: C(Y|X) for all 16 pairs, and each X's own tokens.

The rule: k = 16 and λ_max = μ_max = 0.9999 fixed; (a, b, c, T) and the copy model's (α, β)
minimise the mean over cases of log(C_memory / C_context) — each case's relative saving counts the
same, whatever its size — for each copy order in --orders (0: no copy model), and the order with the
lowest wins. Adam, 800 steps, from (3, -1, 0.5, T = 5, α = 0, β = 1). Prints the parameters for
`models/conditioning.py` and every case's ratio; the neighbours are computed once (and kept with
--cases), so refitting is seconds.

    python benchmarks/conditioning_fit.py --cases /tmp/r8-cases.pt   # 22 min on one CPU thread, then ~1 min an order

`--ngram=3,2,1,0` adds the n-gram cache (models/ngram.py) of orders 0..K for each K listed (-1:
none), its parameters (ln β_k and a_k for each order, from 0 and -3, and b from 0) fitted with all
the others, by the same rule: `--orders 3 --dims 128 --ngram=3,2,1,0 --cases …`, ~1 min a fit.

`--mode adapt` fits the copy model of `adapt` mode (models/adapt.py) on the same cases: the
adapted LM's bits of each case (the shipped `adapt` parameters without a copy model or n-gram
cache) are computed once, and (α, β), with `--ngram` the n-gram cache's parameters too, minimise
the mean over cases of log(C_with them / C_without) — the same rule, as the LM part does not
depend on them — for each order; the lowest wins.

    python benchmarks/conditioning_fit.py --mode adapt --threads 2 --cases /tmp/r8-adapt-cases.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import platform
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classify.data import load_examples  # noqa: E402
from codelen.datasets import RECORD_SEPARATOR  # noqa: E402
from models.adapt import AdaptCompressor  # noqa: E402
from models.conditioning import ADAPT  # noqa: E402
from models.lm import Joined, load_lm_compressor  # noqa: E402
from models.memory import (  # noqa: E402
    Memory,
    MemoryCompressor,
    MemoryParams,
    Neighbours,
    copy_mixture,
    copy_predictions,
    mixture_bits,
)
from models.ngram import ngram_counts, ngram_mixture, token_bits  # noqa: E402
from models.protocol import Conditioning  # noqa: E402

VOCAB = 49152  # SmolLM2's: the n-gram cache's uniform floor and its keys' width


@dataclasses.dataclass
class Case:
    found: Neighbours  # the coded tokens' LM bits and neighbours
    run: int  # the kNN run before them
    context_bits: float  # C_context of those tokens
    sequence: list[int]  # X, or X then Y
    first: int  # the first coded token of `sequence`
    x: str | None  # the case whose X precedes (its copy model's state is this one's start)

    @property
    def limits(self) -> torch.Tensor:
        return self.found.limits


@dataclasses.dataclass
class AdaptCase:
    bits: torch.Tensor  # the coded tokens' bits under the adapted LM (no copy model)
    limits: torch.Tensor  # how many tokens lie before each one's window
    sequence: list[int]
    first: int
    x: str | None

    @functools.cached_property
    def targets(self) -> torch.Tensor:
        """The coded tokens (made once: the fit mixes them 800 times)."""
        return torch.tensor(self.sequence[self.first :])


def texts_by_label(path: Path) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for e in load_examples(path):
        texts.setdefault(e.label, []).append(e.text)
    return texts


def split(
    texts: dict[str, list[str]], seed: int, encode
) -> tuple[list[str], dict[str, list[int]], list[tuple[str, str]]]:
    """The cases' texts: the Xs' names, name -> tokens of each X and Y, and the (X, Y) pairs."""
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
    encoded = {n: list(encode(RECORD_SEPARATOR.join(t))) for n, t in {**xs, **ys}.items()}
    return list(xs), encoded, pairs


def cases_for(compressor: MemoryCompressor, texts: dict[str, list[str]], seed: int) -> dict[str, Case]:
    """name -> case: the neighbours of the coded tokens and what the copy model needs."""
    xs, encoded, pairs = split(texts, seed, compressor.lm.encode)
    out: dict[str, Case] = {}
    for name in xs:
        x = encoded[name]
        own = compressor.neighbours(x, None)
        out[f"{name}: X itself"] = Case(own, 0, float(own.lm_bits.sum()), x, 0, None)
        hits = own.has_memory & (own.tokens[:, 0] == own.targets)
        bits = torch.zeros(len(x), dtype=torch.float64)
        memory = Memory(own.keys, own.norms, own.targets, bits, hits, key_offset=own.key_offset)
        for xn, yn in pairs:
            if xn == name:
                xy = [*x, *encoded[yn]]
                after = compressor.neighbours(xy, memory)
                out[f"{name}: Y={yn}"] = Case(
                    after, memory.run_at_end(), float(after.lm_bits.sum()), xy, len(x), f"{name}: X itself"
                )
    return out


def adapt_cases_for(compressor: AdaptCompressor, texts: dict[str, list[str]], seed: int) -> dict[str, AdaptCase]:
    """name -> case: the adapted LM's bits of the coded tokens, as `adapt` mode codes them."""
    xs, encoded, pairs = split(texts, seed, compressor.lm.encode)
    out: dict[str, AdaptCase] = {}
    for name in xs:
        x = encoded[name]
        bits, limits, state = compressor.lm_bits(x, train_last=True)
        out[f"{name}: X itself"] = AdaptCase(bits, limits, x, 0, None)
        state = compressor._replay(x, state, None) if compressor.params.replay else state
        for xn, yn in pairs:
            if xn == name:
                y = encoded[yn]
                bits, limits, _ = compressor.lm_bits(Joined(x, y), len(x), state)
                out[f"{name}: Y={yn}"] = AdaptCase(bits, limits, [*x, *y], len(x), f"{name}: X itself")
        print(f"# {name}: {time.strftime('%H:%M:%S')}", flush=True)
    return out


def fit_copy(cases: dict[str, AdaptCase], order: int, steps: int = 800, ngram: int = -1) -> dict[str, object]:
    """The copy model's (α, β) for `adapt`, and with an n-gram cache of orders 0..`ngram` (ln β_k,
    a_k, b), minimising the mean log(C_with them / C_without)."""
    start = (0.0, 1.0) + _ngram_start(ngram)
    values = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in start]
    copy = copies(cases, order)
    counts = ngram_counts_of(cases, ngram) if ngram >= 0 else {}
    optimizer = torch.optim.Adam(values, lr=0.05)
    for _ in range(steps):
        params = _copy_params(values, ngram)
        ratios = [with_copy(c, params, copy[n], counts.get(n)) / c.bits.sum() for n, c in cases.items()]
        loss = sum(torch.log(r) for r in ratios) / len(cases)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = _copy_params([v.detach() for v in values], ngram)
    return {"params": params, "loss": float(loss.detach()), "copy": copy, "counts": counts}


def _copy_params(values: list[torch.Tensor], ngram: int) -> SimpleNamespace:
    return SimpleNamespace(copy_bias=values[0], copy_length=values[1], copy_max=0.9999, **_ngram(values[2:], ngram))


def _ngram_start(ngram: int) -> tuple[float, ...]:
    """The n-gram cache's starting values for orders 0..ngram: ln β_k = 0, a_k = -3, b = 0 (none: ())."""
    return (*[0.0] * (ngram + 1), *[-3.0] * (ngram + 1), 0.0) if ngram >= 0 else ()


def _ngram(values: list[torch.Tensor], ngram: int) -> dict[str, object]:
    """The n-gram cache's parameters from the values `_ngram_start` began (none: an empty cache)."""
    m = ngram + 1
    if not m:
        return {"ngram_smoothing": [], "ngram_bias": (), "ngram_count": 0.0, "ngram_max": 0.9999}
    return {
        "ngram_smoothing": [torch.exp(v) for v in values[:m]],
        "ngram_bias": torch.stack(values[m : 2 * m]),
        "ngram_count": values[2 * m],
        "ngram_max": 0.9999,
    }


def _ngram_text(p: SimpleNamespace, ngram: int) -> str:
    """The fitted n-gram parameters as the models/conditioning.py arguments ('' without a cache)."""
    if ngram < 0:
        return ""
    return (
        f", ngram_smoothing={tuple(round(float(v), 3) for v in p.ngram_smoothing)}, "
        f"ngram_bias={tuple(round(float(v), 3) for v in p.ngram_bias)}, ngram_count={float(p.ngram_count):.3g}"
    )


def with_copy(case: AdaptCase, params: object, copy: tuple, counts: tuple | None = None) -> torch.Tensor:
    bits = copy_mixture(case.bits, case.targets, *copy, params)  # type: ignore[arg-type]
    if counts is not None:
        bits = ngram_mixture(bits, *counts, params, VOCAB)  # type: ignore[arg-type]
    return bits.sum()


def copies(cases: dict, order: int) -> dict[str, tuple]:
    """name -> the copy model's (predicted, matched) for each case's coded tokens."""
    out, states = {}, {}
    for name, case in sorted(cases.items(), key=lambda kv: kv[1].x is not None):  # Xs first
        state = states[case.x] if case.x else (-1, 0)
        predicted, matched, states[name], _ = copy_predictions(
            case.sequence, case.first, case.limits.tolist(), order, state
        )
        out[name] = (predicted, matched)
    return out


def total_bits(case: Case, params: object, copy: tuple = (None, None), counts: tuple | None = None) -> torch.Tensor:
    f = case.found
    bits, _ = mixture_bits(f.lm_bits, f.targets, f.distances, f.tokens, f.has_memory, case.run, params, *copy)
    if counts is not None:
        bits = ngram_mixture(bits, *counts, params, VOCAB)
    return bits.sum()


def ngram_counts_of(cases: dict[str, Case], order: int) -> dict[str, tuple]:
    """name -> the n-gram cache's counts (models/ngram.py) of each case's coded tokens, over the
    positions of its sequence before each one's window (X's included, as X's index gives them to a Y)."""
    width, out = token_bits(VOCAB), {}
    for name, case in cases.items():
        followed, occurred, _ = ngram_counts(np.asarray(case.sequence), case.first, case.limits.numpy(), order, width)
        out[name] = (followed, occurred)
    return out


def fit(cases: dict[str, Case], k: int, order: int = 0, steps: int = 800, ngram: int = -1) -> dict[str, object]:
    """(a, b, c, T), with a copy model of `order` tokens (α, β), and with an n-gram cache of
    orders 0..`ngram` (ln β_k, a_k, b), minimising the mean log ratio."""
    start = (3.0, -1.0, 0.5, math.log(5.0)) + ((0.0, 1.0) if order else ())
    start += _ngram_start(ngram)
    values = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in start]
    copy = copies(cases, order) if order else {}
    counts = ngram_counts_of(cases, ngram) if ngram >= 0 else {}
    optimizer = torch.optim.Adam(values, lr=0.05)
    for _ in range(steps):
        params = _params(values, k, order, ngram)
        ratios = [
            total_bits(c, params, copy.get(n, (None, None)), counts.get(n)) / c.context_bits for n, c in cases.items()
        ]
        loss = sum(torch.log(r) for r in ratios) / len(cases)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = _params([v.detach() for v in values], k, order, ngram)
    return {"params": params, "loss": float(loss.detach()), "copy": copy, "counts": counts}


def _params(values: list[torch.Tensor], k: int, order: int, ngram: int = -1) -> SimpleNamespace:
    a, b, c, log_t = values[:4]
    alpha, beta = values[4:6] if order else (0.0, 0.0)
    return SimpleNamespace(
        bias=a, distance=b, run=c, temperature=torch.exp(log_t), max_weight=0.9999, k=k,
        order=order, copy_bias=alpha, copy_length=beta, copy_max=0.9999,
        **_ngram(values[6:] if order else values[4:], ngram),
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/r8/r8_train.txt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", default="0,3,4,6,8", help="copy model orders to fit (0: none); the lowest loss wins")
    ap.add_argument("--cases", help="keep the cases' neighbours in this file (refits then take seconds)")
    ap.add_argument("--mode", choices=("memory", "adapt"), default="memory")
    ap.add_argument("--dims", type=int, default=0, help="memory: keys projected on the head's top DIMS directions")
    ap.add_argument("--scaled", action="store_true", help="memory, with --dims: scaled by their singular values")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--ngram", default="-1", help="memory: n-gram cache orders K to fit, 0..K (-1: none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    if args.mode == "adapt":
        return main_adapt(args, started)
    k = 16
    if args.cases and Path(args.cases).exists():
        cases = torch.load(args.cases, weights_only=False)
    else:
        lm = load_lm_compressor(args.model)
        # The mode as this run fits it (whatever parameters the model ships with, if any).
        lm.info = dataclasses.replace(
            lm.info, modes=(*(m for m in lm.info.modes if m.mode != "memory"), Conditioning("memory", (), "fit"))
        )
        start = MemoryParams(k=k, temperature=1.0, bias=0.0, distance=0.0, run=0.0, dims=args.dims, scaled=args.scaled)
        compressor = MemoryCompressor(lm, start, 0)
        texts = texts_by_label(Path(args.data))
        cases = cases_for(compressor, texts, args.seed)
        if args.cases:
            torch.save(cases, args.cases)
    print(f"# {args.model} on {args.data}, seed {args.seed}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    tokens = sum(len(c.found.targets) for c in cases.values())
    print(f"# neighbours of {tokens} tokens in {time.time() - started:.0f} s")
    results = {}
    for order in (int(o) for o in args.orders.split(",")):
        for ngram in (int(g) for g in args.ngram.split(",")):
            results[(order, ngram)] = r = fit(cases, k, order, ngram=ngram)
            p = r["params"]
            copy = f", order={order}, copy_bias={p.copy_bias:.3g}, copy_length={p.copy_length:.3g}" if order else ""
            grams = _ngram_text(p, ngram)
            print(
                f"MemoryParams(k={k}, temperature={p.temperature:.3g}, bias={p.bias:.3g}, "
                f"distance={p.distance:.3g}, run={p.run:.3g}{copy}{grams})   mean log ratio {r['loss']:.4f}",
                flush=True,
            )
    best_key = min(results, key=lambda o: results[o]["loss"])
    best = results[best_key]
    print(f"# lowest: copy order {best_key[0]}, n-gram order {best_key[1]}")
    for name, case in cases.items():
        mem = float(total_bits(case, best["params"], best["copy"].get(name, (None, None)), best["counts"].get(name)))
        ctx = case.context_bits
        print(f"{name:24s} context {ctx:10.0f} bits   memory {mem:10.0f}   ratio {mem / ctx:.3f}")
    return 0


def main_adapt(args: argparse.Namespace, started: float) -> int:
    base = dataclasses.replace(ADAPT[args.model], order=0, ngram_smoothing=(), ngram_bias=())
    if args.cases and Path(args.cases).exists():
        cases = torch.load(args.cases, weights_only=False)
    else:
        lm = load_lm_compressor(args.model)
        texts = texts_by_label(Path(args.data))
        cases = adapt_cases_for(AdaptCompressor(lm, base, 0), texts, args.seed)
        if args.cases:
            torch.save(cases, args.cases)
    print(f"# adapt {base} of {args.model} on {args.data}, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    tokens = sum(len(c.bits) for c in cases.values())
    print(f"# the adapted LM's bits of {tokens} tokens in {time.time() - started:.0f} s")
    results = {}
    for order in (int(o) for o in args.orders.split(",") if int(o)):
        for ngram in (int(g) for g in args.ngram.split(",")):
            results[(order, ngram)] = r = fit_copy(cases, order, ngram=ngram)
            p = r["params"]
            grams = _ngram_text(p, ngram)
            print(f"order={order}, copy_bias={p.copy_bias:.3g}, copy_length={p.copy_length:.3g}{grams}   "
                  f"mean log ratio {r['loss']:.4f}", flush=True)  # fmt: skip
    key = min(results, key=lambda o: results[o]["loss"])
    best = results[key]
    print(f"# lowest: copy order {key[0]}, n-gram order {key[1]}")
    for name, case in cases.items():
        plain = float(case.bits.sum())
        mixed = float(with_copy(case, best["params"], best["copy"][name], best["counts"].get(name)))
        print(f"{name:24s} adapt {plain:10.0f} bits   with the copy model {mixed:10.0f}   ratio {mixed / plain:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
