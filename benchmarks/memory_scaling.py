"""How `memory` mode scales to large Xs: two measurements behind its fixed parameters.

`precision`: what storing the keys in fp16 instead of fp32 changes. C(X) and C(Y|X) of the
containment cases (Y's records in the middle of X, and absent), coded once with each key precision
from the same forward passes (the model's states are computed once and reused; only the rounding
of the states the memory keeps differs).

`horizon`: the cost of the kNN search per token once X is longer than the horizon, against the
model's forward pass in the same run: what `horizon` (the kNN memory's reach) must be for
`memory` to keep a given share of `context` mode's token rate at any size of X. One step of
`memory` mode: the model's states for `--windows` windows of the data (the forward pass that
`context` mode also makes), then the exact search of those states among `horizon` keys (every
token past the first `horizon` pays exactly that). The keys are random: the cost of an exact
search does not depend on their values.

`overhead`: the memory a build holds per token of X beyond its keys (the keys are bounded by the
horizon; this is what grows with X): the peak RSS of coding a sequence of n tokens in `memory`
mode against `context` mode, each in a process of its own, with the tiny random model (its
forward passes take seconds, and its per-token arrays are the real model's; its keys are few:
horizon 4,096). The slope between two sizes is the bytes a token.

`per-y`: what one more Y costs after X's memory (or `adapt`'s trained state) is built and
cached (a matrix row, many pairs), or after X in `context` mode, against the same Y coded alone,
at several sizes of X; tiny random model, horizon 4,096, so the model and the search cost the
same at every size: what grows
with X is work the code does over all of X again for each Y.

`search-bounds`: can the exact kNN search get cheaper? With real states (`--tokens` tokens of the
data, the last 4,096 as queries, the keys before their window), the squared distance projected on
the top r principal directions of the keys (orthonormal: a lower bound of the true one): the share
of keys an exact search would still have to measure (bound below the query's k-th nearest), the
share of (query, 4,096-key block) pairs it could skip, and, as an approximate search, how often the
top K' by projected distance, re-ranked exactly, hold the exact k nearest. Other projections for
reference: the coordinates of most variance, the embedding's top singular directions.

    python benchmarks/memory_scaling.py precision [--data ../shared/data/sms_spam/sms_spam.tsv] [--x-bytes 40000]
    python benchmarks/memory_scaling.py horizon --threads 2 [--horizons 65536,131072,262144,524288]
    python benchmarks/memory_scaling.py overhead [--tokens 200000,1000000]
    python benchmarks/memory_scaling.py per-y [--tokens 100000,1000000] [--mode context|adapt]
    python benchmarks/memory_scaling.py search-bounds --tokens 40000 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditioning import DATA, conditions, containment_texts, text_stream  # noqa: E402

import models.memory as memory  # noqa: E402
from codelen.datasets import RECORD_SEPARATOR  # noqa: E402
from codelen.settings import Settings  # noqa: E402
from models.conditioning import MEMORY, conditioned  # noqa: E402
from models.lm import LMCompressor  # noqa: E402
from models.protocol import Segment  # noqa: E402
from models.registry import Registry  # noqa: E402


def precision(lm: LMCompressor, args: argparse.Namespace) -> None:
    x_copy, x_absent, y_text = containment_texts(args)
    conditions(args, f" · X {len(x_copy.encode())} bytes, Y {len(y_text.encode())} bytes")
    computed: dict[tuple, list] = {}
    forward = lm.token_states

    def reused(sequences, first):  # the same call gives the same states: compute them once
        key = (tuple(tuple(torch.as_tensor(s).tolist()) for s in sequences), tuple(first))
        if key not in computed:
            computed[key] = forward(sequences, first=first)
        return computed[key]

    lm.token_states = reused  # type: ignore[method-assign]
    results = {}
    for dtype in (torch.float32, torch.float16):
        memory.KEY_DTYPE = dtype
        compressor = conditioned(lm, "memory", 1 << 30, 0)
        for label, x in (("copy", x_copy), ("absent", x_absent)):
            sx, sy = compressor.encode(x), compressor.encode(y_text)
            started = time.perf_counter()
            joint, alone = compressor.score([Segment(sx, sy), Segment((), sy)])
            results[dtype, label] = joint
            print(
                f"keys {str(dtype).removeprefix('torch.'):8s} Y {label:6s}: C(X) {joint.prefix_bits:.3f}  "
                f"C(Y|X) {joint.target_bits:.3f}  C(Y) {alone.target_bits:.3f}  "
                f"ratio {joint.target_bits / alone.target_bits:.4f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    for label in ("copy", "absent"):
        a, b = results[torch.float32, label], results[torch.float16, label]
        print(
            f"fp16 - fp32, Y {label}: C(X) {b.prefix_bits - a.prefix_bits:+.4f} bits, "
            f"C(Y|X) {b.target_bits - a.target_bits:+.4f} bits"
        )


def horizon(lm: LMCompressor, args: argparse.Namespace) -> None:
    context, stride = lm.window.context_tokens, lm.window.stride
    n = context + (args.windows - 1) * stride  # the tokens of `windows` sliding windows
    tokens = list(lm.encode(RECORD_SEPARATOR.join(text_stream(args, 6 * n))))[: n + context]
    conditions(args, f" · {args.windows} windows of {context} tokens, stride {stride}")
    started = time.perf_counter()
    ((_, states),) = lm.token_states([tokens[: n + context]], first=[context])  # the step after a first window
    forward = time.perf_counter() - started
    m = len(states)
    print(f"forward pass: {m} tokens in {forward:.1f} s ({m / forward:.0f} tokens/s)")
    gen = torch.Generator().manual_seed(args.seed)
    shipped = MEMORY[args.model]
    # The keys as the shipped parameters make them, and (if those are projected) the whole states.
    for params in dict.fromkeys([shipped, dataclasses.replace(shipped, dims=0)]):
        queries = memory.MemoryCompressor(lm, params, 0).keys_of(states).cpu()
        for size in (int(h) for h in args.horizons.split(",")):
            keys = (torch.randn(size, queries.shape[1], generator=gen) * queries.std()).to(memory.KEY_DTYPE)
            norms = (keys.float() ** 2).sum(1)
            started = time.perf_counter()
            memory.search(queries, keys, norms, torch.full((m,), size), params.k)
            seconds = time.perf_counter() - started
            print(
                f"keys of {queries.shape[1]} dimensions, horizon {size:8d}: search {seconds:6.1f} s "
                f"({seconds / m * 1e3:.2f} ms a token); "
                f"forward's share of the step {forward / (forward + seconds):.0%}",
                flush=True,
            )


def overhead(args: argparse.Namespace) -> None:
    args.model, args.data = "tiny-random", "random tokens, half of them repeats"
    conditions(args, " · horizon 4,096, a process per run")
    peaks: dict[tuple[str, int], float] = {}
    for n in (int(t) for t in args.tokens.split(",")):
        for mode in ("context", "memory"):
            command = [sys.executable, __file__, "overhead-one", "--mode", mode, "--n", str(n)]
            run = json.loads(subprocess.run(command + ["--threads", str(args.threads)], capture_output=True,
                                            text=True, check=True).stdout.splitlines()[-1])  # fmt: skip
            peaks[mode, n] = run["peak_mb"]
            print(f"{n:9d} tokens  {mode:8s}: peak RSS +{run['peak_mb']:7.1f} MB  ({run['seconds']:.0f} s)", flush=True)
        extra = peaks["memory", n] - peaks["context", n]
        print(f"{n:9d} tokens  memory over context: {extra:.1f} MB, {extra * 2**20 / n:.0f} B a token", flush=True)
    sizes = sorted({n for _, n in peaks})
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        for mode in ("context", "memory"):
            slope = (peaks[mode, b] - peaks[mode, a]) * 2**20 / (b - a)
            print(f"{mode:8s}: {slope:.0f} B a token between {a} and {b} tokens")


def _tiny(n: int, seed: int, mode: str = "memory", cache_bytes: int = 0) -> tuple[LMCompressor, object, tuple]:
    """The tiny model, its compressor in `mode` (`memory`: horizon 4,096) and n tokens, half of
    them repeats."""
    from models.memory import MemoryCompressor
    from models.tiny import tiny_compressor

    lm = tiny_compressor(context_tokens=512, stride=256)
    rng = random.Random(seed)
    records = [rng.randrange(3, 259) for _ in range(20_000)]
    tokens = tuple(records[rng.randrange(20_000)] if rng.random() < 0.5 else rng.randrange(3, 259) for _ in range(n))
    if mode in ("context", "adapt"):
        return lm, conditioned(lm, mode, 0, cache_bytes), tokens
    return lm, MemoryCompressor(lm, dataclasses.replace(MEMORY["tiny-random"], horizon=4096), cache_bytes), tokens


def per_y(args: argparse.Namespace) -> None:
    args.model, args.data = "tiny-random", "random tokens, half of them repeats"
    conditions(args, f" · {args.mode} mode (memory: horizon 4,096) · 20 Ys of 300 tokens")
    rng = random.Random(args.seed + 1)
    ys = [tuple(rng.randrange(3, 259) for _ in range(300)) for _ in range(20)]
    for n in (int(t) for t in args.tokens.split(",")):
        lm, compressor, x = _tiny(n, args.seed, args.mode, 1 << 30)
        started = time.perf_counter()
        if args.mode != "context":
            compressor.score([Segment((), x)])  # X's memory or trained state, built once and cached
        built = time.perf_counter() - started
        timed = {}
        for label, segments in (("alone", [Segment((), y) for y in ys]), ("after X", [Segment(x, y) for y in ys])):
            coder = lm if label == "alone" else compressor
            started = time.perf_counter()
            for segment in segments:
                coder.score([segment], need_prefix=False)  # as a worker asks for C(Y|X)
            timed[label] = (time.perf_counter() - started) / len(ys) * 1e3
        print(
            f"X {n:8d} tokens (built in {built:.0f} s): a Y alone {timed['alone']:.1f} ms, "
            f"after X {timed['after X']:.1f} ms, {timed['after X'] - timed['alone']:.1f} ms more",
            flush=True,
        )


def overhead_one(args: argparse.Namespace) -> None:
    _, compressor, tokens = _tiny(args.n, args.seed, args.mode)
    compressor.score([Segment((), tokens[:1000])])  # the first call's allocations are not the sequence's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    compressor.score([Segment((), tokens)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (peak - before) / 1024, "seconds": time.perf_counter() - started}))


def search_bounds(lm: LMCompressor, args: argparse.Namespace) -> None:
    n, m, k = int(args.tokens.split(",")[0]), 4096, MEMORY[args.model].k
    tokens = list(lm.encode(RECORD_SEPARATOR.join(text_stream(args, 6 * n))))[:n]
    started = time.perf_counter()
    ((_, states),) = lm.token_states([tokens], first=[0])
    conditions(args, f" · {len(tokens)} tokens' states ({time.perf_counter() - started:.0f} s), k {k}")
    states = states.to(memory.KEY_DTYPE).float()
    queries, keys = states[-m:], states[: len(states) - m - lm.window.context_tokens]
    keys = keys[: len(keys) // memory.KEY_BLOCK * memory.KEY_BLOCK]
    exact = torch.cdist(queries, keys).square()
    kth = exact.topk(k, 1, largest=False).values
    print(
        f"{m} queries, {len(keys)} keys: squared distance to the k-th nearest, median {kth[:, -1].median():.0f}; "
        f"to any key, median {exact.median():.0f}"
    )
    sample = keys[:8192] - keys[:8192].mean(0)
    principal = torch.linalg.eigh((sample.T @ sample).double()).eigenvectors.flip(1).float()
    head = lm.model.get_input_embeddings().weight.detach().float()
    singular = torch.linalg.eigh((head.T @ head).double()).eigenvectors.flip(1).float()
    variance = torch.eye(keys.shape[1])[:, keys[:8192].var(0).argsort(descending=True)]
    blocks = len(keys) // memory.KEY_BLOCK
    for name, basis in (("principal", principal), ("variance", variance), ("embedding", singular)):
        for r in (32, 64, 128):
            bound = torch.cdist(queries @ basis[:, :r], keys @ basis[:, :r]).square()
            below = bound < kth[:, -1:]
            pairs = below.view(m, blocks, -1).any(2).float().mean()
            found = []
            for top in (64, 256):
                picked = exact.gather(1, bound.topk(top, 1, largest=False).indices)
                found.append((picked.topk(k, 1, largest=False).values[:, -1] <= kth[:, -1]).float().mean())
            print(
                f"{name:9s} r {r:3d}: keys to measure {below.float().mean():6.1%}, blocks to measure "
                f"{pairs:6.1%}; exact k nearest among top 64 / 256 {found[0]:6.1%} / {found[1]:6.1%}",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("precision", "horizon", "overhead", "overhead-one", "per-y", "search-bounds"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x-bytes", type=int, default=40_000, help="precision: the containment X's size")
    ap.add_argument("--windows", type=int, default=8, help="horizon: windows per step (as MemoryCompressor)")
    ap.add_argument("--horizons", default="65536,131072,262144,524288")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="200000,1000000", help="overhead: the sequence lengths")
    ap.add_argument("--mode", default="memory", help="per-y: context, memory or adapt")
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what in ("overhead", "overhead-one", "per-y"):
        {"overhead": overhead, "overhead-one": overhead_one, "per-y": per_y}[args.what](args)
        return 0
    lm = Registry(Settings(models=args.model)).get(args.model)
    {"precision": precision, "horizon": horizon, "search-bounds": search_bounds}[args.what](lm, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
