"""The `fusion` method's experts on a split, and every way of combining them, from one pass.

    nice python benchmarks/classify_fusion.py --data ../shared/data/ag_news/test.csv \\
        --train-per-class 250 --test-per-class 50 --out /tmp/fusion.jsonl

Runs `FusionClassifier.experts` (the LM's C(x | nearest examples), gzip's C(x | class corpus), and
both C(x) alone) text by text through the real engine (`LMCompressor.score`), writes them to
--out as JSON lines, and prints the accuracy of: the LM alone, gzip alone, and the fusion rules
(the sum of code lengths, and the relative rule, at several weights), so the default's choice can
be checked on other data. Same split and ties as `codelen eval`. --fast-engine turns the engine's
deterministic CPU mode off (2.3x faster here; code lengths equal to float rounding).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from classify.base import argmin_label, text_rng  # noqa: E402
from classify.data import load_examples, split  # noqa: E402
from classify.methods import build  # noqa: E402
from codelen.settings import Settings  # noqa: E402
from models.registry import Registry  # noqa: E402


def fast_lm(model_id: str):
    """load_lm_compressor(model_id, device="cpu") with deterministic=False."""
    import torch

    from models import lm, weights

    model, tokenizer, revision = weights.load(model_id, None, device="cpu", dtype=torch.float32)
    return lm.LMCompressor(
        model,
        tokenizer,
        model_id=model_id,
        revision=revision,
        batch_tokens=lm.CPU_BATCH_TOKENS,
        start_token_id=lm._START_TOKEN.get(model_id),
        description=weights.source(model_id).description,
        deterministic=False,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--test-data")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-col", default="text")
    p.add_argument("--option", default="{}", help="fusion options as JSON")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--fast-engine",
        action="store_true",
        help="LM without the engine's deterministic CPU mode (same code lengths to float rounding, faster)",
    )
    p.add_argument("--start", type=int, default=0, help="begin at this test text (wrapping around): fresh texts first")
    args = p.parse_args()
    load = dict(text_col=args.text_col)
    examples = load_examples(args.data, **load)
    tests = load_examples(args.test_data, **load) if args.test_data else None
    data = split(examples, args.train_per_class, args.test_per_class, args.seed, tests)
    registry = Registry(Settings(models=args.model, preload=""))
    if args.fast_engine:
        registry._loaded[args.model] = fast_lm(args.model)
    options = {"seed": args.seed, **json.loads(args.option)}
    clf = build(
        "fusion", lambda: registry.get(args.model), [e.text for e in data.train], [e.label for e in data.train], options
    )
    order = [*range(args.start, len(data.test)), *range(min(args.start, len(data.test)))]
    rows, started = [], time.perf_counter()
    with open(args.out, "w") as out:
        for n, index in enumerate(order):
            ex = data.test[index]
            got = clf.experts([ex.text], alone=True)
            row = {"index": index, "label": ex.label, **{k: v[0] for k, v in got.items()}}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            spent = time.perf_counter() - started
            print(
                f"\r{n + 1}/{len(data.test)} texts, {spent / (n + 1):.2f} s/text", end="", file=sys.stderr, flush=True
            )
    print(file=sys.stderr)
    per_text = (time.perf_counter() - started) / max(len(rows), 1)

    def accuracy(rule) -> float:
        hits = 0
        for row in rows:
            ex = data.test[row["index"]]
            bits = {lab: rule(row, lab) for lab in clf.labels}
            hits += argmin_label(bits, text_rng(args.seed, ex.text)) == row["label"]
        return round(hits / len(rows), 4)

    report = {
        "data": args.data,
        "model": args.model,
        "train": len(data.train),
        "test": len(data.test),
        "s_per_text": round(per_text, 2),
        "model_alone": accuracy(lambda r, lab: r["model"][lab]),
        "classical_alone": accuracy(lambda r, lab: r["classical"][lab]),
    }
    for w in (0.5, 0.75, 1.0, 1.5, 2.0):
        report[f"bits_w{w}"] = accuracy(lambda r, lab, w=w: r["model"][lab] + w * r["classical"][lab])
    for w in (1.0, 2.0, 4.0):
        report[f"relative_w{w}"] = accuracy(
            lambda r, lab, w=w: r["model"][lab] / r["model_alone"] + w * r["classical"][lab] / r["classical_alone"]
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
