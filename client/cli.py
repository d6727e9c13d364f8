"""`codelen score | submit | matrix | plot`: the service from a shell, no HTTP code needed.

Every command that talks to a server takes --url (default $CODELEN_URL, else
http://127.0.0.1:8000) and --api-key (default $CODELEN_API_KEY, sent as a Bearer token).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from client.api import Client, CodelenError, JobStatus, ScoreResult, content_key, matrix_body

Command = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction) -> None:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=None, help="service URL (default: $CODELEN_URL or http://127.0.0.1:8000)")
    server.add_argument("--api-key", default=None, help="API key (default: $CODELEN_API_KEY)")
    server.add_argument("--model", default=None, help="model id (default: the service's default)")
    server.add_argument("--conditioning", choices=("context", "memory", "adapt"), default="context",
                        help="how X conditions Y: the model's window (default), a memory of earlier tokens "
                             "(kNN within a horizon, a copy model over all), or the model trained on X "
                             "(and the same copy model); "
                             "GET /v1/models shows each model's modes and parameters")
    one_way = argparse.ArgumentParser(add_help=False)
    one_way.add_argument("--direction", choices=("both", "y_given_x"), default="both",
                         help="y_given_x: compute C(Y|X) only, not C(X|Y) (half the work for a large X)")

    p = sub.add_parser("score", parents=[server, one_way], help="score one pair: code lengths, shared information, NCD",
                       description="X and Y are file paths or literal texts (a path that exists is read as a file).")
    p.add_argument("x")
    p.add_argument("y")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=_friendly(score))

    p = sub.add_parser("submit", parents=[server, one_way],
                       help="score a JSONL file of pairs as chunked jobs (resumable)",
                       description='Input: one {"custom_id", "x", "y"} a line. Output: one line a pair with '
                                   "custom_id and every score field. Rerun the same command to resume.")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--chunk-size", type=int, default=200, help="pairs per job (default 200)")
    p.add_argument("--concurrency", type=int, default=4, help="jobs in flight at once (default 4)")
    p.add_argument("--max-chunk-bytes", type=int, default=4 * 1024 * 1024, help="request body bound per job")
    p.add_argument("--retries", type=int, default=30, help="retries per request, waiting Retry-After or backoff")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=_friendly(submit))

    p = sub.add_parser("matrix", parents=[server], help="NCD and shared-information matrix of N datasets",
                       description="Each file is a dataset; a folder of files gives a dataset per file; a folder "
                                   "of folders gives a dataset per subfolder, each file in it one record.")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, help="out.csv, out.npy (+ .labels.json) or out.json")
    p.add_argument("--metric", choices=("ncd", "shared"), default="ncd", help="matrix for .csv/.npy (default ncd)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_friendly(matrix))

    p = sub.add_parser("plot", help="heatmap + dendrogram PNG of a matrix file")
    p.add_argument("matrix", type=Path, help="a .csv, .npy or .json written by `codelen matrix`")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--metric", choices=("ncd", "shared"), default=None, help="for a .json: which matrix")
    p.add_argument("--clusters", type=int, default=None, help="colour the tree as K clusters")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_friendly(plot))


def _friendly(func: Command) -> Command:
    """Errors a user can act on as one line on stderr, not a traceback."""
    from client.batch import InputError
    from client.matrix import MatrixInputError

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CodelenError as exc:
            print(f"codelen {args.command}: {exc}", file=sys.stderr)
            return 1
        except (InputError, MatrixInputError, FileNotFoundError) as exc:
            print(f"codelen {args.command}: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ncodelen {args.command}: interrupted", file=sys.stderr)
            return 130

    return run


# -- score -------------------------------------------------------------------------------------


def _text_or_file(value: str) -> str:
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # a long literal text, or one with a NUL, is not a valid path
        pass
    return value


def format_scores(s: ScoreResult) -> str:
    cl, cond, bpb = s["code_lengths"], s["conditional"], s["bits_per_byte"]
    window = s["window"]
    policy = window.get("policy", "?")
    if window.get("context_tokens"):
        policy += f", {window['context_tokens']} tokens, stride {window['stride']}"
    rows = [
        ("model", f"{s['model']['id']} (revision {s['model']['revision'][:12]})"),
        ("bytes", f"X {s['bytes']['x']:,}   Y {s['bytes']['y']:,}"),
        ("C(X), C(Y)", f"{cl['x']:,.1f}   {cl['y']:,.1f} bits   ({bpb['x']:.3f}, {bpb['y']:.3f} bits/byte)"),
        ("C(XY), C(YX)", f"{cl['xy']:,.1f}   {_bits(cl['yx'])}"),
        ("C(Y|X), C(X|Y)", f"{cond['y_given_x']:,.1f}   {_bits(cond['x_given_y'])}"),
        ("/C(Y), /C(X)", f"{_ratio(cond['y_given_x'], cl['y'])}   {_ratio(cond['x_given_y'], cl['x'])}"),
        ("shared info", f"{s['shared_information']:,.1f} bits"),
        ("NCD", f"{s['ncd']:.4f}"),
        ("window", policy),
        ("conditioning", s.get("conditioning", {}).get("mode", "context")),
        ("cached", "yes" if s.get("cached") else "no"),
    ]
    return "\n".join(f"{k:<16}{v}" for k, v in rows)


def _bits(value: float | None) -> str:
    return "(not computed)" if value is None else f"{value:,.1f} bits"


def _ratio(conditional: float | None, alone: float) -> str:
    """What is left of a code length once the other dataset is known (0: all of it is shared)."""
    return "(not computed)" if conditional is None else f"{conditional / alone:.4f}"


def score(args: argparse.Namespace) -> int:
    from client.progress import ProgressBar

    bar = ProgressBar(0, unit="tokens", quiet=args.json)  # drawn only if the score becomes a job

    def progress(status: JobStatus) -> None:
        p = status["progress"]
        bar.total = max(p.get("tokens_total", 0), 1)
        bar.update(p.get("tokens_done", 0))

    with Client(args.url, args.api_key) as api:
        try:
            result = api.score(
                _text_or_file(args.x), _text_or_file(args.y), args.model,
                conditioning=args.conditioning, direction=args.direction, on_progress=progress,
            )
        finally:
            if bar.done:
                bar.close()
    print(json.dumps(result, indent=2) if args.json else format_scores(result))
    return 0


# -- submit ------------------------------------------------------------------------------------


def submit(args: argparse.Namespace) -> int:
    from client.batch import InputError, submit_file

    if args.chunk_size < 1 or args.concurrency < 1:
        raise InputError("--chunk-size and --concurrency must be at least 1")
    if args.output.resolve() == args.input.resolve():
        raise InputError("the output must not be the input file")
    return asyncio.run(
        submit_file(
            args.input, args.output, url=args.url, api_key=args.api_key, model=args.model,
            chunk_size=args.chunk_size, concurrency=args.concurrency, max_chunk_bytes=args.max_chunk_bytes,
            retries=args.retries, quiet=args.quiet, conditioning=args.conditioning, direction=args.direction,
        )
    )


# -- matrix ------------------------------------------------------------------------------------


def matrix(args: argparse.Namespace) -> int:
    from client import matrix as matrices
    from client.progress import ProgressBar, duration

    if args.output.suffix.lower() not in (".csv", ".npy", ".json"):
        raise matrices.MatrixInputError(f"{args.output}: write .csv, .npy or .json")
    datasets = matrices.collect(args.inputs)
    n = len(datasets)
    body = matrix_body(datasets, args.model, conditioning=args.conditioning)
    bar = ProgressBar(n * (n + 1) // 2, quiet=args.quiet)
    started = time.monotonic()
    with Client(args.url, args.api_key, on_retry=lambda why, s: bar.note(f"{why}; retrying in {s:.1f} s")) as api:
        key = content_key(body)  # a rerun re-attaches to the same job, unless that one failed
        job = api.submit(body, key)
        for attempt in range(1, 4):
            if job["status"] not in ("failed", "cancelled"):
                break
            job = api.submit(body, f"{key}-{attempt}")

        def progress(status: JobStatus) -> None:
            p = status["progress"]
            if p.get("tokens_total"):
                bar.suffix = f"{p['tokens_done']:,}/{p['tokens_total']:,} tokens"
            bar.update(p["done"])

        try:
            api.wait(job["id"], on_progress=progress)
        finally:
            bar.close()
        doc = api.results(job["id"], include="matrix")
    matrices.write(doc["matrix"], args.output, matrices.METRICS[args.metric], doc["model"])
    if not args.quiet:
        extra = f" (+ {matrices.labels_path(args.output).name})" if args.output.suffix.lower() == ".npy" else ""
        print(f"{n} datasets, {n * (n + 1) // 2} pairs, model {doc['model']}, in {duration(time.monotonic() - started)}"
              f" → {args.output}{extra}", file=sys.stderr)
    return 0


# -- plot --------------------------------------------------------------------------------------


def plot(args: argparse.Namespace) -> int:
    missing = [m for m in ("matplotlib", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"codelen plot needs {' and '.join(missing)}: pip install 'codelen[plot]'", file=sys.stderr)
        return 2
    from client import matrix as matrices
    from client.plot import plot as draw

    m = matrices.read(args.matrix, matrices.METRICS[args.metric] if args.metric else None)
    order = draw(m, args.output, title=args.title, k=args.clusters)
    print(f"{args.output}: {len(order)} datasets in tree order: {', '.join(order)}", file=sys.stderr)
    return 0
