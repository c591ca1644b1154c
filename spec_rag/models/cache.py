"""One loaded copy per model in the process: :func:`get_model` caches :func:`load_model`."""

from __future__ import annotations

import os
import threading

import torch

from spec_rag.models.gguf import ModelAndTokenizer
from spec_rag.models.loading import load_model, resolve_dtype, resolve_model_source

__all__ = ["clear_model_cache", "get_model"]

_CacheKey = tuple[str, str, str, str | None]  # (source, dtype, device, attention implementation)
_cache: dict[_CacheKey, ModelAndTokenizer] = {}
_key_locks: dict[_CacheKey, threading.Lock] = {}
_cache_lock = threading.Lock()


def get_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    allow_download: bool | None = None,
) -> ModelAndTokenizer:
    """:func:`load_model` through a process-wide cache, so every caller shares one loaded copy.

    Safe across threads: a per-key lock makes concurrent requests for the same model wait for
    one load, while different models still load side by side.
    """
    source = resolve_model_source(name_or_path, allow_download=allow_download)
    torch_device = torch.device(device) if device is not None else torch.device("cpu")
    key: _CacheKey = (
        f"{source.kind}:{source.location}",
        str(resolve_dtype(dtype, torch_device)),
        str(torch_device),
        attn_implementation,
    )
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        loaded = load_model(
            name_or_path,
            dtype=dtype,
            device=torch_device,
            attn_implementation=attn_implementation,
            allow_download=allow_download,
        )
        with _cache_lock:
            _cache[key] = loaded
        return loaded


def clear_model_cache() -> None:
    """Forget every model :func:`get_model` holds (memory is freed once no caller keeps one)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()
