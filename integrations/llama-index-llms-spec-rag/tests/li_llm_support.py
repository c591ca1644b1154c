"""Test helpers: the tiny offline models and town documents of :mod:`spec_rag.testing`, an offline embedder,
and the switch that skips tests of the real SmolLM2 pack.

A uniquely named helper module rather than a ``conftest.py``: the core's tests import their
own ``conftest`` by name, which another ``conftest`` module loaded beside them would shadow.
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import pytest
from llama_index.core.embeddings import BaseEmbedding

from spec_rag.testing import (
    AURORA_ANSWER,
    AURORA_QUESTION,
    TOWN_DOCUMENTS,
    corpus_text,
    tiny_model,
    tiny_tokenizer,
    tiny_tools_tokenizer,
)

__all__ = [
    "AURORA_ANSWER",
    "AURORA_QUESTION",
    "TOWN_DOCUMENTS",
    "HashEmbedding",
    "corpus_text",
    "skip_without_real_models",
    "tiny_model",
    "tiny_tokenizer",
    "tiny_tools_tokenizer",
]

#: Goes with ``pytest.mark.real_model`` (tests that load the SmolLM2-135M pack): SPEC_RAG_SKIP_REAL=1
#: skips them, as the core's conftest does for its own tests.
skip_without_real_models = pytest.mark.skipif(
    os.environ.get("SPEC_RAG_SKIP_REAL") == "1", reason="SPEC_RAG_SKIP_REAL=1"
)


class HashEmbedding(BaseEmbedding):
    """Bag-of-words vectors hashed into ``dim`` buckets: an offline, deterministic embed model,
    so a VectorStoreIndex works in tests without downloading an embedding model."""

    dim: int = 256

    @classmethod
    def class_name(cls) -> str:
        return "HashEmbedding"

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)
