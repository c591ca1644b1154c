"""langchain-tests' standard unit suite for ChatSpecKV with its default flags (construction,
parameters, binding tools and structured output; no model runs)."""

from __future__ import annotations

from typing import Any

from langchain_spec_rag import ChatSpecKV
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatSpecKVUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSpecKV]:
        return ChatSpecKV

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Registry names: construction must stay cheap, so nothing is loaded by these tests. The
        # default pair's template renders tools, so binding them is checked (from the tokenizer
        # alone) where its pack is installed.
        return {
            "model": "qwen2.5-coder-1.5b-instruct",
            "draft": "qwen2.5-coder-0.5b-instruct",
            "max_capacity_prompt": 256,
        }

    @property
    def supports_model_override(self) -> bool:
        return False
