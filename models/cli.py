"""`codelen prepare`: convert the LM weights once, so every later start loads in seconds."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="convert model weights into the local cache (no network)")
    p.add_argument("models", nargs="*", help="model ids (default: every LM the settings serve)")
    p.set_defaults(func=prepare)


def prepare(args: argparse.Namespace) -> int:
    from codelen.settings import get_settings
    from models.registry import LM_IDS
    from models.weights import prepare as prepare_weights

    settings = get_settings()
    ids = args.models or [m for m in settings.model_ids() if m in LM_IDS]
    for model_id in ids:
        started = time.perf_counter()
        prepared = prepare_weights(model_id, settings.weights_cache_dir)
        elapsed = time.perf_counter() - started
        print(f"{model_id}: revision {prepared.revision[:16]}… in {prepared.path} ({elapsed:.1f} s)")
    return 0
