"""Compressors by id: built once, on first use or at start-up, shared by every request."""

from __future__ import annotations

import threading

from codelen.settings import Settings
from models.classical import CODECS, ClassicalCompressor
from models.protocol import Compressor

LM_IDS = ("smollm2-135m", "gemma3-270m")
TEST_IDS = ("tiny-random",)


class UnknownModel(KeyError):
    pass


class ModelUnavailable(RuntimeError):
    """A served model could not be loaded (weights missing, conversion failed)."""


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ids = [m for m in settings.model_ids() if m in CODECS or m in LM_IDS or m in TEST_IDS]
        unknown = set(settings.model_ids()) - set(self._ids)
        if unknown:
            raise ValueError(f"CODELEN_MODELS names unknown models: {sorted(unknown)}")
        self._loaded: dict[str, Compressor] = {}
        self._conditioned: dict[tuple[str, str], Compressor] = {}  # (model, mode) -> its compressor
        self._locks = {m: threading.Lock() for m in self._ids}

    def ids(self) -> list[str]:
        return list(self._ids)

    def check(self, model_id: str) -> None:
        if model_id not in self._ids:
            raise UnknownModel(model_id)

    def loaded(self, model_id: str) -> bool:
        return model_id in self._loaded

    def loaded_ids(self) -> list[str]:
        """The models this process has built (an LM: its weights are in memory)."""
        return sorted(self._loaded)

    def get(self, model_id: str, mode: str = "context") -> Compressor:
        """The compressor of `model_id` coding in conditioning `mode`, loading the model on first
        use (blocking; call from a worker thread). UnsupportedMode if the model has no such mode."""
        base = self._base(model_id)
        if mode == "context":
            return base
        key = (model_id, mode)
        if key not in self._conditioned:
            with self._locks[model_id]:
                if key not in self._conditioned:
                    from models.conditioning import conditioned  # torch: only where models run

                    s = self.settings
                    self._conditioned[key] = conditioned(base, mode, s.memory_cache_bytes, s.adapt_cache_bytes)
        return self._conditioned[key]

    def _base(self, model_id: str) -> Compressor:
        self.check(model_id)
        if model_id in self._loaded:
            return self._loaded[model_id]
        with self._locks[model_id]:
            if model_id not in self._loaded:
                try:
                    self._loaded[model_id] = self._build(model_id)
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    raise ModelUnavailable(f"model {model_id!r} could not be loaded: {reason}") from exc
        return self._loaded[model_id]

    def _build(self, model_id: str) -> Compressor:
        s = self.settings
        if model_id in CODECS:
            return ClassicalCompressor(model_id)
        if model_id == "tiny-random":
            from models.tiny import tiny_compressor

            return tiny_compressor(context_tokens=s.context_tokens or 64, stride=s.stride or 32)
        from models.lm import load_lm_compressor

        return load_lm_compressor(
            model_id,
            s.weights_cache_dir,
            device=s.device,
            context_tokens=s.context_tokens,
            stride=s.stride,
            batch_tokens=s.batch_tokens,
        )
