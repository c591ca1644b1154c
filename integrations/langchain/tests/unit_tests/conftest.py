"""Tiny random models with a real (offline-trained) BPE tokenizer, from :mod:`spec_rag.testing`:
every code path, no download."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from spec_rag.testing import tiny_model, tiny_tokenizer, tiny_tools_tokenizer, watch_layer_reads


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


@pytest.fixture
def layer_reads() -> Iterator[Callable[[Any], list[int]]]:
    """``watch(model)`` gives the list of tokens each call of the model's first layer reads,
    filled as the test runs; the hooks go when it ends."""
    hooks: list[Any] = []

    def watch(model: Any) -> list[int]:
        reads, hook = watch_layer_reads(model)
        hooks.append(hook)
        return reads

    yield watch
    for hook in hooks:
        hook.remove()
