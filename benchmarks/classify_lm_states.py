"""`probe` beside `knn-lm` from one LM pass: each alone and their products, on one split.

    nice python benchmarks/classify_lm_states.py --data ../shared/data/ag_news/test.csv \\
        --train-per-class 250 --test-per-class 50 --model smollm2-135m [--fast-engine]

Both methods read the LM's per-token states (`token_states`); a memoizing wrapper computes them
once per text, so the classifiers' own code (`build("probe" | "knn-lm", …)`) runs on shared
states. Prints, as JSON lines: the conditions; `probe` at its cross-validated weight decay and at
each weight decay of the grid (CV accuracy on the examples, test accuracy); `knn-lm` with its
defaults; and the product C_knn-lm(x | y) + w · C_gzip(x | y) + β · C_probe(y | x) for each β.
Same split and ties as `codelen eval`. --fast-engine turns the engine's deterministic CPU mode
off (states equal to float rounding).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.classify_split import accuracy, add_split_args, conditions, split_and_lm  # noqa: E402
from classify.methods import build  # noqa: E402


class Memo:
    """The compressor with `token_states` computed once per sequence."""

    def __init__(self, lm) -> None:
        self.lm, self.cache, self.info, self.num_layers = lm, {}, lm.info, lm.num_layers

    def encode(self, text: str):
        return self.lm.encode(text)

    def token_states(self, sequences, layers=()):
        keys = [(tuple(s), tuple(layers)) for s in sequences]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        outs = self.lm.token_states([list(k[0]) for k in todo], layers) if todo else []
        for key, out in zip(todo, outs, strict=True):
            self.cache[key] = out
        return [self.cache[k] for k in keys]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_args(p)
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 5.0, 10.0, 20.0, 50.0])
    args = p.parse_args()

    sp, lm = split_and_lm(args)
    memo = Memo(lm)
    train_texts, train_labels = [e.text for e in sp.train], [e.label for e in sp.train]
    texts, truth = [e.text for e in sp.test], [e.label for e in sp.test]

    t0 = time.perf_counter()
    memo.token_states([lm.encode(t) for t in train_texts + texts])
    lm_s = time.perf_counter() - t0
    per_text = round(lm_s / max(1, len(train_texts) + len(texts)), 3)
    print(json.dumps(conditions(args, len(train_texts), len(texts)) | {"lm_pass_s_per_text": per_text}), flush=True)
    t0 = time.perf_counter()
    probe = build("probe", lambda: memo, train_texts, train_labels, {"seed": args.seed})
    fit_s = time.perf_counter() - t0
    probe_bits = probe.bits(texts)
    print(
        json.dumps(
            {
                "method": "probe",
                "weight_decay": probe.weight_decay,
                "cv_accuracy": probe.cv_accuracy,
                "accuracy": accuracy(texts, truth, probe_bits, args.seed),
                "fit_s_after_lm": round(fit_s, 1),
            }
        ),
        flush=True,
    )
    for wd in probe.cv_accuracy:
        fixed = build("probe", lambda: memo, train_texts, train_labels, {"seed": args.seed, "weight_decay": wd})
        print(
            json.dumps(
                {
                    "method": "probe",
                    "weight_decay": wd,
                    "accuracy": accuracy(texts, truth, fixed.bits(texts), args.seed),
                }
            ),
            flush=True,
        )

    knn = build("knn-lm", lambda: memo, train_texts, train_labels, {"seed": args.seed})
    knn_bits = [p.bits for p in knn.predict(texts)]
    print(
        json.dumps({"method": "knn-lm", "defaults": True, "accuracy": accuracy(texts, truth, knn_bits, args.seed)}),
        flush=True,
    )
    for beta in args.beta:
        fused = [{y: k[y] + beta * q[y] for y in k} for k, q in zip(knn_bits, probe_bits, strict=True)]
        print(
            json.dumps(
                {"method": "knn-lm + beta * probe", "beta": beta, "accuracy": accuracy(texts, truth, fused, args.seed)}
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
