"""`knn-lm` on a split: one LM pass, then a grid of its options, beside gzip and zstd on the same split.

    nice python benchmarks/classify_knn_lm.py --data ../shared/data/ag_news/test.csv \\
        --train-per-class 250 --test-per-class 50 --model smollm2-135m [--fast-engine]

Fits `KnnLmClassifier` once (the memories: every training token's state), computes each test
text's per-token bits and states once, then scores every (k, temperature, memory_weight) of the
grid through the classifier's own `_text_bits`, and each with the classical expert added at
several weights (gzip C(x | label corpus), from the `conditional` classifier). Prints one line per
setting, the defaults marked, and the conditions. Same split and ties as `codelen eval`.
--fast-engine turns the engine's deterministic CPU mode off (states equal to float rounding).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.classify_split import accuracy, add_split_args, conditions, split_and_lm  # noqa: E402
from classify.knn_lm import KnnLmOptions  # noqa: E402
from classify.methods import build  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--temperature", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    p.add_argument("--memory-weight", type=float, nargs="+", default=[0.8, 0.9, 0.97])
    p.add_argument("--classical-weight", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    args = p.parse_args()

    sp, lm = split_and_lm(args)
    train_texts, train_labels = [e.text for e in sp.train], [e.label for e in sp.train]
    texts, truth = [e.text for e in sp.test], [e.label for e in sp.test]

    t0 = time.perf_counter()
    clf = build("knn-lm", lambda: lm, train_texts, train_labels, {"classical_weight": 0.0})
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    seqs = [lm.encode(t) for t in texts]
    states = clf._states(seqs)
    lm_s = time.perf_counter() - t0
    gzip = build("conditional", lambda: _classical(), train_texts, train_labels, {"seed": args.seed})
    classical = gzip.lengths(texts)[0]
    median = clf.temperature / clf.opts.temperature  # the median squared distance

    defaults = KnnLmOptions()
    run = {
        "memory_tokens": clf.memory_tokens,
        "fit_s": round(fit_s, 1),
        "lm_pass_s_per_text": round(lm_s / max(1, len(texts)), 3),
    }
    print(json.dumps(conditions(args, len(train_texts), len(texts)) | run), flush=True)
    for k, temp, lam in itertools.product(args.k, args.temperature, args.memory_weight):
        clf.opts = clf.opts.model_copy(update={"k": k, "temperature": temp, "memory_weight": lam})
        clf.temperature = temp * median
        t0 = time.perf_counter()
        bits = [
            clf._text_bits(torch.tensor(ids, dtype=torch.long), b, h) for ids, (b, h) in zip(seqs, states, strict=True)
        ]
        mem_ms = 1000 * (time.perf_counter() - t0) / max(1, len(texts))
        accs = {
            w: accuracy(
                texts,
                truth,
                [{y: m[y] + w * c[y] for y in m} for m, c in zip(bits, classical, strict=True)],
                clf.opts.seed,
            )
            for w in args.classical_weight
        }
        default = (k, temp, lam) == (defaults.k, defaults.temperature, defaults.memory_weight)
        print(
            json.dumps(
                {"k": k, "temperature": temp, "memory_weight": lam, "memory_ms_per_text": round(mem_ms, 1)}
                | {f"acc_classical_weight_{w}": a for w, a in accs.items()}
                | ({"default": True} if default else {})
            ),
            flush=True,
        )
    return 0


def _classical():
    from models.classical import ClassicalCompressor

    return ClassicalCompressor("gzip")


if __name__ == "__main__":
    raise SystemExit(main())
