"""Tiny random models with a real (offline-trained) BPE tokenizer, from :mod:`spec_rag.testing`:
every code path, no download."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from spec_rag.testing import tiny_model, tiny_tokenizer, tiny_tools_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def target(tokenizer: PreTrainedTokenizerFast) -> Any:
    return tiny_model(tokenizer, seed=1, layers=3)


@pytest.fixture(scope="session")
def draft(tokenizer: PreTrainedTokenizerFast) -> Any:
    return tiny_model(tokenizer, seed=2, layers=2)


@pytest.fixture(scope="session")
def tool_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a Qwen2.5-style chat template that renders tools."""
    return tiny_tools_tokenizer()
