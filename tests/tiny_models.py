"""The core's test helpers: :mod:`spec_rag.testing` under the names the tests use.

A uniquely named module (not ``conftest``) so that the integrations' conftest files cannot
shadow it when the whole repository is collected at once.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast

from spec_rag.testing import ARCHS, corpus_text
from spec_rag.testing import tiny_model as _tiny_model
from spec_rag.testing import tiny_tokenizer as _tokenizer

__all__ = ["ARCHS", "_tokenizer", "corpus_text", "tiny_model"]


def tiny_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, layers: int = 2, **overrides: Any
):
    return _tiny_model(tokenizer, arch=arch, seed=seed, layers=layers, **overrides)
