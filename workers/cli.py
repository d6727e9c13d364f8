"""`codelen worker`: a distributed-mode worker (needs REDIS_URL); run one per GPU."""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="compute code lengths for the Redis queue (distributed mode)")
    p.add_argument("--models", help="comma-separated model ids to load and serve (default: CODELEN_MODELS)")
    p.add_argument("--name", help="consumer name in the Redis group (default: host-pid-random)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: none)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=worker)


def worker(args: argparse.Namespace) -> int:
    from codelen.settings import get_settings
    from workers.worker import run_worker

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if not settings.redis_url:
        raise SystemExit("codelen worker needs REDIS_URL (or CODELEN_REDIS_URL), e.g. redis://localhost:6379/0")
    if args.models:
        settings = settings.model_copy(update={"models": args.models})
    return run_worker(settings, args.name, args.metrics_port)
