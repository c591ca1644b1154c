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
        # Registry names: construction must stay cheap, so nothing is loaded by these tests.
        return {
            "model": "smollm2-135m-instruct",
            "draft": "smollm2-135m-instruct",
            "max_capacity_prompt": 256,
        }

    @property
    def supports_model_override(self) -> bool:
        return False
