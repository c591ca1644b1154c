"""langchain-tests' standard integration suite for ChatSpecKV: SmolLM2-135M (target and draft; its
chat template has no tools) in every run, the Qwen2.5-Coder pair with tools and structured output
on with `-m slow`."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_spec_rag import ChatSpecKV
from langchain_tests.integration_tests import ChatModelIntegrationTests

pytestmark = pytest.mark.real_model

SMOLLM2 = "smollm2-135m-instruct"


class TestChatSpecKVIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSpecKV]:
        return ChatSpecKV

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # A short answer keeps the ~20 generations of the suite to about a minute on 2 CPU cores.
        return {
            "model": SMOLLM2,
            "draft": SMOLLM2,
            "method": "speckv",
            "max_capacity_prompt": 256,
            "max_tokens": 12,
        }

    # A local 135M chat model: text in, text out; no tools, structured output or other media.
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per instance; build another ChatSpecKV to switch

    @property
    def returns_usage_metadata(self) -> bool:
        return True


@pytest.mark.slow
class TestChatSpecKVQwenIntegration(TestChatSpecKVIntegration):
    """The Qwen2.5-Coder pair, whose chat template renders tools: the suite with tool calling,
    tool choice, structured output and JSON mode on."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # A joke in a tool call takes up to ~80 tokens; the draft looks 16 tokens ahead.
        return {
            "model": "qwen2.5-coder-1.5b-instruct",
            "draft": "qwen2.5-coder-0.5b-instruct",
            "method": "speckv",
            "max_capacity_prompt": 384,  # holds the tools template's structure (~240) and the window
            "lookahead_tokens": 16,
            "max_tokens": 96,
        }

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True
