"""The floors of the tree: what each package may import (read from the source with `ast`).

`codelen/` is the ground floor (settings, keys, datasets, scores, model info): it imports nothing
from the packages built on it. `classify/` is a library of methods over the compressor protocol,
used by `codelen eval` and the service alike: no Redis, no HTTP, no service or worker code.
Every Redis client comes from one factory, `codelen.redis_client.connect`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from codelen.redis_client import connect

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("codelen", "models", "workers", "service", "classify", "client")
ABOVE_THE_GROUND = set(PACKAGES) - {"codelen"}


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
    paths = sorted((ROOT / package).rglob("*.py"))
    found = {str(path.relative_to(ROOT)): sorted(imports(path) & forbidden) for path in paths}
    return {path: names for path, names in found.items() if names}


def test_the_ground_floor_imports_nothing_above_it() -> None:
    # codelen/cli.py loads each package's subcommands by module name (COMMAND_MODULES): the console
    # script's plug-in list, not an import of their code into the ground floor.
    assert offenders("codelen", ABOVE_THE_GROUND) == {}


def test_the_classification_library_imports_no_redis_http_or_service() -> None:
    assert offenders("classify", {"redis", "fastapi", "starlette", "service", "workers"}) == {}


def test_every_redis_client_comes_from_the_one_factory() -> None:
    builders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                    if name in ("from_url", "Redis", "StrictRedis"):
                        builders.append(str(path.relative_to(ROOT)))
    assert builders == ["codelen/redis_client.py"]  # one call, in `connect`


def test_the_factory_retries_a_command_that_meets_a_closed_connection() -> None:
    client = connect("redis://localhost:6379/0")
    retried = client.connection_pool.connection_kwargs["retry_on_error"]
    assert RedisConnectionError in retried and RedisTimeoutError in retried
    assert client.connection_pool.connection_kwargs["decode_responses"] is True
