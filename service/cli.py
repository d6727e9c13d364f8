"""`codelen serve`: the HTTP API (embedded mode unless REDIS_URL is set)."""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from codelen.settings import get_settings
    from service.app import create_app
    from service.http_limits import uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    config = uvicorn_config(
        create_app(settings), settings, host=args.host, port=args.port, log_level=args.log_level, access_log=False
    )
    uvicorn.Server(config).run()
    return 0
