"""What the LM-state classification benchmarks share: the split's options, the split, the LM.

Same split and ties as `codelen eval`; `--fast-engine` turns the engine's deterministic CPU mode
off (states equal to float rounding)."""

from __future__ import annotations

import argparse
import datetime
import platform
from collections.abc import Mapping, Sequence

import torch

from benchmarks.classify_fusion import fast_lm
from classify.base import argmin_label, text_rng
from classify.data import Split, load_examples, split
from codelen.settings import Settings
from models.registry import Registry


def add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True)
    p.add_argument("--test-data")
    p.add_argument("--text-col", default="text")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-engine", action="store_true")


def split_and_lm(args: argparse.Namespace) -> tuple[Split, object]:
    """The seeded split of --data (and --test-data), and the LM compressor of --model."""
    examples = load_examples(args.data, text_col=args.text_col)
    test_examples = load_examples(args.test_data, text_col=args.text_col) if args.test_data else None
    sp = split(examples, args.train_per_class, args.test_per_class, args.seed, test_examples)
    lm = fast_lm(args.model) if args.fast_engine else Registry(Settings(models=args.model, preload="")).get(args.model)
    return sp, lm


def conditions(args: argparse.Namespace, n_train: int, n_test: int) -> dict[str, object]:
    """The run's conditions, the first JSON line of each benchmark."""
    return {
        "data": args.data,
        "model": args.model,
        "train": n_train,
        "test": n_test,
        "seed": args.seed,
        "engine": "fast" if args.fast_engine else "deterministic",
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(),
        "date": datetime.date.today().isoformat(),
    }


def accuracy(texts: Sequence[str], truth: Sequence[str], bits: Sequence[Mapping[str, float]], seed: int) -> float:
    """Share of texts whose lowest-bits label is right, ties broken as `codelen eval` does."""
    right = sum(argmin_label(b, text_rng(seed, t)) == y for t, y, b in zip(texts, truth, bits, strict=True))
    return round(right / max(1, len(texts)), 3)
