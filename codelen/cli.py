"""The `codelen` console script. Each part of the project registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with a `register(subparsers)` function; each adds subcommands that set `func`.
COMMAND_MODULES = ("service.cli", "models.cli", "workers.cli", "classify.cli", "client.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codelen", description="Code lengths, shared information and NCD with LM compressors."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
