"""LM classification methods on a labeled file, beside the classical baselines, one split.

    nice python benchmarks/classify_eval.py --data ../shared/data/ag_news/test.csv \\
        --train-per-class 250 --test-per-class 10 --config conditional:max_windows=1 \\
        --config conditional:max_windows=null,combine=logsumexp

Each --config is METHOD[:KEY=VALUE,...] (VALUE parsed as JSON). LM methods run through
benchmarks/prefix_reuse.PrefixReuse (same code lengths as LMCompressor.score, each class window
computed once), which is what makes CPU runs of a few minutes possible. Prints one JSON line per
configuration with accuracy, macro-F1 and time, and the conditions (machine, model, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prefix_reuse import PrefixReuse  # noqa: E402
from classify.data import load_examples, split  # noqa: E402
from classify.evaluate import evaluate  # noqa: E402
from classify.methods import resolve_model  # noqa: E402
from codelen.settings import Settings  # noqa: E402
from models.registry import LM_IDS, Registry  # noqa: E402


def parse_config(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return method, options


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--test-data")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-col", default="label")
    p.add_argument("--text-col", default="text")
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--config", action="append", default=[], help="METHOD[:KEY=VALUE,...]")
    p.add_argument("--baselines", action="store_true")
    args = p.parse_args()
    load = dict(label_col=args.label_col, text_col=args.text_col, header=False if args.no_header else None)
    examples = load_examples(args.data, **load)
    tests = load_examples(args.test_data, **load) if args.test_data else None
    data = split(examples, args.train_per_class, args.test_per_class, args.seed, tests)
    configs = [parse_config(c) for c in args.config]
    if args.baselines:
        configs = [("gzip-knn", {}), ("zstd-dict", {}), ("conditional", {"model": "gzip"}), *configs]
    settings = Settings(models=f"{args.model},gzip,zstd", preload="")
    registry = Registry(settings)
    wrapped: dict[str, object] = {}

    def compressor(model: str):
        if model not in wrapped:
            c = registry.get(model)
            wrapped[model] = PrefixReuse(c) if model in LM_IDS or model == "tiny-random" else c
        return wrapped[model]

    conditions = {
        "data": args.data,
        "train": len(data.train),
        "test": len(data.test),
        "seed": args.seed,
        "dropped_duplicates": data.duplicates_dropped,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch CPU fp32",
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(conditions), flush=True)
    for method, options in configs:
        fixed = method in ("gzip-knn", "zstd-dict")
        model = resolve_model(method, options.pop("model", None) or (None if fixed else args.model), args.model)
        options.setdefault("seed", args.seed)
        started = time.perf_counter()
        report = evaluate(data, method, model, lambda m=model: compressor(m), options, chunk=len(data.test))
        doc = report.as_dict()
        doc.pop("confusion")
        doc["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
