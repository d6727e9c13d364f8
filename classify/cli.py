"""`codelen eval`: accuracy of a classification method on a labeled file, beside the baselines.

    codelen eval --data ../shared/data/ag_news/test.csv --method conditional --model gzip \\
        --train-per-class 250 --test-per-class 50 --seed 0 --baselines
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from classify.methods import METHODS

    p = sub.add_parser("eval", help="measure a classification method on a labeled CSV/TSV/JSONL file")
    p.add_argument("--data", required=True, help="labeled file (CSV, TSV, JSONL, or the AG News CSV layout)")
    p.add_argument("--test-data", help="a separate test file in the same layout (e.g. R8's r8_test.txt)")
    p.add_argument("--method", default="conditional", choices=sorted(METHODS))
    p.add_argument("--model", help="model id (default: the service's default model; baselines fix theirs)")
    p.add_argument("--train-per-class", type=int, default=None, help="training examples per label (default: all)")
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the tie-breaking")
    p.add_argument("--k", type=int, help="neighbours for knn methods")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option; VALUE is JSON if it parses, else a string (repeatable)",
    )
    p.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl", "agnews"])
    p.add_argument("--label-col", default="label", help="name, or 0-based index with --no-header")
    p.add_argument("--text-col", default="text", help="name, or 0-based index with --no-header")
    p.add_argument("--group-col", default="group", help="examples sharing a group never straddle train and test")
    p.add_argument("--no-header", action="store_true", help="the first row is data (default: detected)")
    p.add_argument("--baselines", action="store_true", help="also run gzip-knn and zstd-dict on the same split")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--png", help="write the confusion matrix of --method as a picture")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict:
    out: dict = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if args.k is not None:
        out["k"] = args.k
    if "seed" not in out:
        out["seed"] = args.seed
    return out


def run(args: argparse.Namespace) -> int:
    from classify.data import DataError, load_examples, split
    from classify.evaluate import evaluate
    from classify.methods import BASELINES, MethodError, parse_options, resolve_model
    from codelen.settings import get_settings
    from models.registry import Registry

    settings = get_settings()
    load = dict(
        fmt=args.format,
        label_col=args.label_col,
        text_col=args.text_col,
        group_col=args.group_col,
        header=False if args.no_header else None,
    )
    try:
        examples = load_examples(args.data, **load)
        test_examples = load_examples(args.test_data, **load) if args.test_data else None
    except (DataError, OSError) as exc:
        print(f"codelen eval: {exc}", file=sys.stderr)
        return 2
    data_split = split(examples, args.train_per_class, args.test_per_class, args.seed, test_examples)
    runs = [(args.method, _options(args))]
    if args.baselines:
        runs += [(b, {"seed": args.seed}) for b in BASELINES if b != args.method]
    try:
        models = {
            m: resolve_model(m, args.model if m == args.method else None, settings.default_model) for m, _ in runs
        }
    except MethodError as exc:
        print(f"codelen eval: {exc}", file=sys.stderr)
        return 2
    settings = settings.model_copy(
        update={"models": ",".join(dict.fromkeys([*settings.model_ids(), *models.values()]))}
    )
    registry = Registry(settings)
    try:
        for m, opts in runs:
            parse_options(m, opts)
            registry.check(models[m])
    except (MethodError, KeyError) as exc:
        print(f"codelen eval: {exc}", file=sys.stderr)
        return 2

    def progress(what: str, done: int, total: int) -> None:
        if not args.quiet:
            end = "\n" if what == "examples" and done == total else ""
            print(f"\r  {done}/{total} {what}", end=end, file=sys.stderr, flush=True)

    reports = []
    for m, opts in runs:
        if not args.quiet:
            n_train, n_test = len(data_split.train), len(data_split.test)
            print(f"{m} ({models[m]}): fitting on {n_train} examples, then {n_test} texts …", file=sys.stderr)
        report = evaluate(data_split, m, models[m], lambda m=m: registry.get(models[m]), opts, progress)
        if not args.quiet:
            print(file=sys.stderr)
        reports.append(report)
    doc = {
        "data": args.data,
        "test_data": args.test_data,
        "seed": args.seed,
        "train": len(data_split.train),
        "test": len(data_split.test),
        "train_test_duplicates_dropped": data_split.duplicates_dropped,
        "notes": data_split.notes,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, device setting {settings.device}",
        "date": datetime.date.today().isoformat(),
        "results": [r.as_dict() for r in reports],
    }
    if args.png:
        _png(reports[0], args.png)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print(doc, reports)
    return 0


def _print(doc: dict, reports: list) -> None:
    print(
        f"data {doc['data']}  train {doc['train']}  test {doc['test']}  seed {doc['seed']}  "
        f"train/test duplicates dropped {doc['train_test_duplicates_dropped']}"
    )
    for note in doc["notes"]:
        print(f"note: {note}")
    print(f"{'method':<14} {'model':<14} {'accuracy':>8} {'macro-F1':>8} {'fit s':>8} {'predict s':>10} {'ms/text':>8}")
    for r in reports:
        d = r.as_dict()
        print(
            f"{r.method:<14} {r.model:<14} {r.accuracy:8.3f} {r.macro_f1:8.3f} {r.fit_s:8.2f} {r.predict_s:10.2f} "
            f"{d['ms_per_text']:8.1f}"
        )
    for r in reports:
        if r.fitted:
            print(f"{r.method} fitted: {json.dumps(r.fitted)}")
    for r in reports:
        print(f"\nconfusion matrix, {r.method} ({r.model}): rows true, columns predicted")
        width = max(6, *(len(lab) for lab in r.labels))
        print(" " * width + " " + " ".join(f"{lab[:width]:>{width}}" for lab in r.labels))
        for lab, row in zip(r.labels, r.confusion, strict=True):
            print(f"{lab[:width]:>{width}} " + " ".join(f"{v:>{width}}" for v in row))


def _png(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(report.confusion, cmap="Blues")
    ax.set_xticks(range(n), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(n), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in report.confusion) or 1
    for i, row in enumerate(report.confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_title(f"{report.method} ({report.model}): accuracy {report.accuracy:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
