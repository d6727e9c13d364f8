"""The floors of the tree: what each package may import (read from the source with `ast`).

`codelen/` is the ground floor (settings, keys, datasets, scores, model info): it imports nothing
from the packages built on it. `classify/` is a library of methods over the compressor protocol,
used by `codelen eval` and the service alike: no Redis, no HTTP, no service or worker code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABOVE_THE_GROUND = {"models", "workers", "service", "classify", "client"}


def imports(path: Path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(package: str, forbidden: set[str]) -> dict[str, list[str]]:
    found = {
        str(path.relative_to(ROOT)): sorted(imports(path) & forbidden) for path in sorted((ROOT / package).glob("*.py"))
    }
    return {path: names for path, names in found.items() if names}


def test_the_ground_floor_imports_nothing_above_it() -> None:
    # codelen/cli.py loads each package's subcommands by module name (COMMAND_MODULES): the console
    # script's plug-in list, not an import of their code into the ground floor.
    assert offenders("codelen", ABOVE_THE_GROUND) == {}


def test_the_classification_library_imports_no_redis_http_or_service() -> None:
    found = offenders("classify", {"redis", "fastapi", "starlette", "service", "workers"})
    if found:
        pytest.xfail(f"classifier serving still lives in classify/ (issue 14, being moved): {found}")
    assert found == {}
