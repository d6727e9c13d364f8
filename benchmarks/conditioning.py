"""Conditioning on a dataset: what `memory` and `adapt` see that the window (`context`) does not,
with zstd and gzip in the same run (docs/BENCHMARKS.md, "Conditioning on a dataset").

    python benchmarks/conditioning.py containment --x-bytes 40000      # and --x-bytes 1000000
    python benchmarks/conditioning.py containment --x-bytes 1000000 --modes memory --cases absent --threads 1
    python benchmarks/conditioning.py similarity                       # 4 x 4 AG News classes
    python benchmarks/conditioning.py prequential --bytes 1000000      # bits/byte of a stream
    python benchmarks/conditioning.py speed --x-bytes 200000           # tokens/s and memory per mode
    python benchmarks/conditioning.py similarity --data ../shared/data/r8/r8_train.txt --modes adapt --adapt replay=2

Data: AG News (`../shared/data/ag_news/test.csv`, or --data); the parameters of `memory` were fitted
on R8 (benchmarks/conditioning_fit.py), not on this. Every number is computed through the
compressors the service runs (`models.registry`), on the device they pick (CPU here).

- containment: Y = 10 texts; X = texts before, Y's texts, texts after (Y in the middle of X), and X
  with 10 other texts in their place; C(Y|X)/C(Y) per mode.
- similarity: the 4 classes as datasets, X = 200 texts of a class, Y = 20 other texts of a class;
  the matrix of C(Y|X)/C(Y), whether each row (a Y) ranks its own class first and by how much
  (margin: the best other class's ratio minus the own class's).
- prequential: one stream of texts, bits per byte under the static model (`context`), the
  prequential code (`adapt`), `memory`, and zstd.
- speed: time and peak memory of C(X) per mode for one X, tokens/s against `context` in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from classify.data import load_examples  # noqa: E402
from codelen.datasets import RECORD_SEPARATOR  # noqa: E402
from codelen.settings import Settings  # noqa: E402
from models.conditioning import ADAPT, MEMORY, conditioned  # noqa: E402
from models.protocol import Segment  # noqa: E402
from models.registry import Registry  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data/ag_news/test.csv"
CLASSICAL = ("zstd", "gzip")


def texts_by_label(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in load_examples(path):
        out.setdefault(e.label, []).append(e.text)
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def text_stream(args: argparse.Namespace, size: int) -> list[str]:
    """The data's texts in a seeded random order, as many as make `size` bytes joined."""
    pool = [t for ts in texts_by_label(Path(args.data)).values() for t in ts]
    random.Random(args.seed).shuffle(pool)
    stream, total = [], 0
    for t in pool:
        stream.append(t)
        total += len(t.encode()) + len(RECORD_SEPARATOR.encode())
        if total >= size:
            break
    return stream


def conditional(registry: Registry, model: str, mode: str, x: str, y: str) -> tuple[float, float, float]:
    """(C(Y|X), C(Y), seconds) under one model and mode."""
    c = registry.get(model, mode)
    sx, sy = c.encode(x), c.encode(y)
    started = time.perf_counter()
    joint, alone = c.score([Segment(sx, sy), Segment((), sy)], need_prefix=False)  # C(X) is not needed
    return joint.target_bits, alone.target_bits, time.perf_counter() - started


def conditions(args: argparse.Namespace, extra: str = "") -> None:
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} · {platform.node()} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) · model {args.model} · data {args.data}{extra}"
    )


def containment_texts(args: argparse.Namespace) -> tuple[str, str, str]:
    """(X holding Y's records in its middle, X without them, Y): 10 texts of a seeded shuffle as
    Y, then other texts around them until X has args.x_bytes."""
    by_label = texts_by_label(Path(args.data))
    pool = [t for ts in by_label.values() for t in ts]
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    y, rest = pool[:10], pool[10:]
    before, after, other = [], [], rest[:10]
    rest = rest[10:]
    size = 0
    for i, t in enumerate(rest):  # half the bytes before Y's texts, half after
        (before if i % 2 == 0 else after).append(t)
        size += len(t.encode()) + 3
        if size >= args.x_bytes:
            break
    join = RECORD_SEPARATOR.join
    return join(before + y + after), join(before + other + after), join(y)


def containment(registry: Registry, args: argparse.Namespace) -> dict:
    x_copy, x_absent, y_text = containment_texts(args)
    conditions(args, f" · X {len(x_copy.encode())} bytes, Y {len(y_text.encode())} bytes")
    rows = {}
    for model, mode in [(c, "context") for c in CLASSICAL] + [(args.model, m) for m in args.modes]:
        for label, x in (("copy", x_copy), ("absent", x_absent)):
            if label not in args.cases:
                continue
            cyx, cy, seconds = conditional(registry, model, mode, x, y_text)
            rows[f"{model} {mode} {label}"] = {"C(Y|X)": cyx, "C(Y)": cy, "ratio": cyx / cy, "seconds": seconds}
            print(
                f"{model:14s} {mode:8s} Y {label:6s}: C(Y|X)/C(Y) = {cyx:9.0f} / {cy:9.0f} = {cyx / cy:.3f}",
                f"({seconds:.0f} s)",
            )
            sys.stdout.flush()
    return rows


def class_datasets(args: argparse.Namespace) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The first 4 classes of the data (or `--classes`: names, or `largest`: the 4 with the most
    texts), and per class X (n_x texts) and Y (the next n_y texts) of a seeded shuffle, each
    joined as one dataset."""
    by_label = texts_by_label(Path(args.data))
    rng = random.Random(args.seed)
    if args.classes == "largest":
        classes = sorted(sorted(by_label, key=lambda c: -len(by_label[c]))[:4])
    else:
        classes = args.classes.split(",") if args.classes else sorted(by_label)[:4]
    short = [c for c in classes if len(by_label.get(c, ())) < args.n_x + args.n_y]
    if short:
        raise SystemExit(f"classes with fewer than {args.n_x + args.n_y} texts (or none): {short}")
    xs, ys = {}, {}
    for c in classes:
        ts = list(by_label[c])
        rng.shuffle(ts)
        xs[c], ys[c] = RECORD_SEPARATOR.join(ts[: args.n_x]), RECORD_SEPARATOR.join(ts[args.n_x : args.n_x + args.n_y])
    return classes, xs, ys


def similarity(registry: Registry, args: argparse.Namespace) -> dict:
    classes, xs, ys = class_datasets(args)
    conditions(args, f" · classes {classes}, X = {args.n_x} texts, Y = {args.n_y} texts")
    out = {}
    for model, mode in [(c, "context") for c in CLASSICAL] + [(args.model, m) for m in args.modes]:
        started = time.perf_counter()
        c = registry.get(model, mode)
        enc = {k: c.encode(v) for k, v in {**{f"x{k}": v for k, v in xs.items()}, **ys}.items()}
        alone = {cj: c.score([Segment((), enc[cj])])[0].target_bits for cj in classes}
        ratio = {}
        for ci in classes:
            bits = c.score([Segment(enc[f"x{ci}"], enc[cj]) for cj in classes], need_prefix=False)
            for cj, b in zip(classes, bits, strict=True):
                ratio[(cj, ci)] = b.target_bits / alone[cj]
        margins, first = [], 0
        print(f"{model} {mode}: rows Y, columns X ({time.perf_counter() - started:.0f} s)")
        print("  C(Y) alone, bits: " + " ".join(f"{alone[cj]:.0f}" for cj in classes))
        for cj in classes:
            own = ratio[(cj, cj)]
            best_other = min(ratio[(cj, ci)] for ci in classes if ci != cj)
            margins.append(best_other - own)
            first += best_other > own
            cells = " ".join(f"{ratio[(cj, ci)]:.3f}" for ci in classes)
            print(f"  Y={cj}: {cells}   margin {best_other - own:+.3f}")
        print(f"  own class first in {first} of {len(classes)} rows, mean margin {sum(margins) / len(margins):+.3f}")
        sys.stdout.flush()
        out[f"{model} {mode}"] = {"matrix": {f"{a}|{b}": v for (a, b), v in ratio.items()}, "margins": margins}
    return out


def prequential(registry: Registry, args: argparse.Namespace) -> dict:
    stream = text_stream(args, args.bytes)
    text = RECORD_SEPARATOR.join(stream)
    n = len(text.encode())
    conditions(args, f" · stream of {len(stream)} texts, {n} bytes")
    out = {}
    for model, mode in [(c, "context") for c in CLASSICAL] + [(args.model, m) for m in args.modes]:
        c = registry.get(model, mode)
        started = time.perf_counter()
        bits = c.score([Segment((), c.encode(text))])[0].target_bits
        seconds = time.perf_counter() - started
        out[f"{model} {mode}"] = {"bits": bits, "bits_per_byte": bits / n, "seconds": seconds}
        print(f"{model:14s} {mode:8s}: {bits / n:.4f} bits/byte ({seconds:.0f} s)")
        sys.stdout.flush()
    return out


def speed(registry: Registry, args: argparse.Namespace) -> dict:
    """C(X) of one X per mode, then C(Y|X) of a 1,000-token Y after it (X's memory or trained
    state from the cache): seconds, tokens/s against `context` in the same run, peak memory."""
    if args.random_weights:
        from engine_throughput import build

        lm = build(args.model, "cuda" if args.device == "cuda" else "cpu", random_weights=True)
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randint(3, lm.head_weight.shape[0], (args.x_bytes // 4,), generator=gen).tolist()
        y = torch.randint(3, lm.head_weight.shape[0], (1000,), generator=gen).tolist()
        compressors = {m: conditioned(lm, m, registry.settings.memory_cache_bytes, 1 << 30) for m in args.modes}
        what = f"random weights, {len(x)} random tokens"
    else:
        stream = text_stream(args, args.x_bytes + 4000)
        compressors = {m: registry.get(args.model, m) for m in args.modes}
        encode = next(iter(compressors.values())).encode
        tokens = list(encode(RECORD_SEPARATOR.join(stream)))
        x, y = tokens[:-1000], tokens[-1000:]
        what = f"{len(x)} tokens of AG News"
    conditions(args, f" · X {what}")
    out = {}
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    for mode, c in compressors.items():
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        c.score([Segment((), x)], need_prefix=False)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        c.score([Segment(x, y)], need_prefix=False)
        y_seconds = time.perf_counter() - started
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if on_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        out[mode] = {"tokens": len(x), "seconds": seconds, "tokens_per_s": len(x) / seconds, "y_seconds": y_seconds}
        print(
            f"{mode:8s}: C(X) {len(x)} tokens in {seconds:.1f} s = {len(x) / seconds:.0f} tokens/s; "
            f"then C(Y|X) of {len(y)} tokens in {y_seconds:.2f} s; peak {'GPU' if on_cuda else 'RSS'} {peak:.0f} MB"
        )
        sys.stdout.flush()
    if "context" in out:
        for mode, row in out.items():
            print(f"{mode:8s}: {row['tokens_per_s'] / out['context']['tokens_per_s']:.0%} of context's token rate")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("containment", "similarity", "prequential", "speed"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="context,memory,adapt")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x-bytes", type=int, default=40_000)
    ap.add_argument("--bytes", type=int, default=1_000_000)
    ap.add_argument("--classes", default="", help="similarity: class names (a,b,c,d) or 'largest' (default: first 4)")
    ap.add_argument("--n-x", type=int, default=200)
    ap.add_argument("--n-y", type=int, default=20)
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--cases", default="copy,absent", help="containment: which Xs (Y's copy in X, Y absent)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random-weights", action="store_true", help="speed: the real shapes, random weights")
    ap.add_argument(
        "--adapt",
        default="",
        help="a variant of adapt's parameters to measure, e.g. 'replay=2' or 'lr=0.01,steps=1' (AdaptParams)",
    )
    ap.add_argument(
        "--memory",
        default="",
        help="a variant of memory's parameters to measure, e.g. 'horizon=0' or 'order=0' (MemoryParams)",
    )
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, table, spec in (("adapt", ADAPT, args.adapt), ("memory", MEMORY, args.memory)):
        if spec:  # 'field=value,...': the mode's parameters for this run, each value of its field's type
            base = table[args.model]
            pairs = (kv.split("=") for kv in spec.split(","))
            table[args.model] = dataclasses.replace(base, **{k: type(getattr(base, k))(v) for k, v in pairs})
            print(f"# {name} variant: {table[args.model]}")
    models = ",".join([args.model, *CLASSICAL])
    registry = Registry(Settings(models=models, device=args.device, redis_url=None))
    result = {"containment": containment, "similarity": similarity, "prequential": prequential, "speed": speed}[
        args.what
    ](registry, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
