"""The methods, one module each. The config classes in :mod:`spec_rag.config` name the module
that runs them; :func:`build_method` builds it, so the engine never branches on the method.

========================  =========================================================
``full.py``               full inference (no config)
``streamingllm.py``       StreamingLLM: attention sinks + recent window
``snapkv.py``             SnapKV: the target's window queries score the cache
``speckv.py``             SpecKV: SnapKV's scores plus the draft's lookahead queries
``specpc.py``             SpecPC: the draft's attention cuts the prompt
``speckv_pc.py``          SpecKV-PC: SpecPC then SpecKV, composed
========================  =========================================================
"""

from __future__ import annotations

import importlib
from typing import Any

from spec_rag.methods.base import CacheMethod, Method, Models, Request, ScoredCache, ScoredPrompt
from spec_rag.methods.full import Full


def build_method(config: Any, models: Models) -> Method:
    """The method that runs ``config`` (``None``: full inference) on ``models``."""
    if config is None:
        return Full(None, models)
    module, _, name = type(config).implementation.partition(":")
    method: Method = getattr(importlib.import_module(module), name)(config, models)
    return method


__all__ = [
    "CacheMethod",
    "Full",
    "Method",
    "Models",
    "Request",
    "ScoredCache",
    "ScoredPrompt",
    "build_method",
]
