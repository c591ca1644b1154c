"""Test helpers: the tiny offline models and town documents of :mod:`spec_rag.testing`,
and the switch that skips tests of the real SmolLM2 pack.

A uniquely named helper module rather than a ``conftest.py``: the core's tests import their
own ``conftest`` by name, which another ``conftest`` module loaded beside them would shadow.
"""

from __future__ import annotations

import os

import pytest

from spec_rag.testing import (
    AURORA_ANSWER,
    AURORA_QUESTION,
    TOWN_DOCUMENTS,
    corpus_text,
    tiny_model,
    tiny_tokenizer,
)

__all__ = [
    "AURORA_ANSWER",
    "AURORA_QUESTION",
    "TOWN_DOCUMENTS",
    "corpus_text",
    "skip_without_real_models",
    "tiny_model",
    "tiny_tokenizer",
]

#: Goes with ``pytest.mark.real_model`` (tests that load the SmolLM2-135M pack): SPEC_RAG_SKIP_REAL=1
#: skips them, as the core's conftest does for its own tests.
skip_without_real_models = pytest.mark.skipif(
    os.environ.get("SPEC_RAG_SKIP_REAL") == "1", reason="SPEC_RAG_SKIP_REAL=1"
)
