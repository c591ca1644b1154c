"""SmolLM2-135M, whose chat template has no tools: structured output through a JSON schema works,
tools are refused with the way out."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from langchain_core.tools import tool
from langchain_spec_rag import ChatSpecKV
from pydantic import BaseModel, Field

from spec_rag import ToolsNotSupportedError

pytestmark = pytest.mark.real_model

SMOLLM2 = "smollm2-135m-instruct"


class Grade(BaseModel):
    """Whether the document answers the question."""

    binary_score: Literal["yes", "no"] = Field(description="'yes' if it does, else 'no'")


@tool
def search_notes(query: str) -> str:
    """Search the team's notes."""
    return query


@pytest.fixture
def chat() -> ChatSpecKV:
    # A new instance builds its engine on first use (the loaded models are shared).
    return ChatSpecKV(model=SMOLLM2, draft=SMOLLM2, method="speckv", max_capacity_prompt=256, max_tokens=24)


def test_json_schema_structured_output_works_without_a_tools_template(chat: ChatSpecKV) -> None:
    question = (
        "Document: The Orchid service listens on port 7319.\nDoes it say which port the Orchid service uses?"
    )
    result = chat.with_structured_output(Grade, method="json_schema", include_raw=True).invoke(question)
    assert isinstance(result, dict) and result["parsing_error"] is None
    assert isinstance(result["parsed"], Grade)
    assert json.loads(result["raw"].content) == result["parsed"].model_dump()  # nothing but the JSON


def test_tools_are_refused_at_bind_naming_the_model_and_the_way_out(chat: ChatSpecKV) -> None:
    # The pack's tokenizer is read from its files, so bind_tools refuses before any model loads.
    with pytest.raises(ToolsNotSupportedError, match=r"smollm2.*Qwen2\.5"):
        chat.bind_tools([search_notes])
    assert chat._core.loaded is None
    # Tools passed to a call directly are refused too, once the models load.
    with pytest.raises(ToolsNotSupportedError, match=r"Qwen"):
        chat.invoke("Which port does the Orchid service listen on?", tools=[{"name": "search_notes"}])
