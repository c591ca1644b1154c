"""Specification of ChatSpecKV's tool calling and structured output (tiny random models: the
adapter's behaviour, not the quality of the calls)."""

from __future__ import annotations

from typing import Any, Literal

import langchain_spec_rag.chat_models as chat_module
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_spec_rag import ChatSpecKV
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from spec_rag import ToolsNotSupportedError
from spec_rag.testing import tiny_model

FACT = "The Aurora vault opens with the code 7319."


class Grade(BaseModel):
    """Whether a document is relevant to the question."""

    binary_score: Literal["yes", "no"] = Field(description="'yes' if relevant, else 'no'")


class GradeDict(TypedDict):
    """Whether a document is relevant to the question."""

    binary_score: Literal["yes", "no"]


class Add(BaseModel):
    """Add two small numbers."""

    a: int = Field(ge=0, le=9)
    b: int = Field(ge=0, le=9)


@tool
def retrieve(query: Literal["vault", "garden"]) -> str:
    """Look up documents about a topic."""
    return FACT


def lookup(topic: str) -> str:
    """Look a topic up."""
    return topic


@pytest.fixture(scope="module")
def tool_target(tool_tokenizer: Any) -> Any:
    return tiny_model(tool_tokenizer, seed=1, layers=3)


@pytest.fixture(scope="module")
def tool_draft(tool_tokenizer: Any) -> Any:
    return tiny_model(tool_tokenizer, seed=2, layers=2)


def _chat(target: Any, tokenizer: Any, draft: Any, **kwargs: Any) -> ChatSpecKV:
    options: dict[str, Any] = {"max_capacity_prompt": 64, "window_size": 8, "max_tokens": 96, **kwargs}
    return ChatSpecKV(
        llm=target, tokenizer=tokenizer, draft_model=draft, draft_tokenizer=tokenizer, **options
    )


@pytest.fixture
def chat(tool_target: Any, tool_tokenizer: Any, tool_draft: Any) -> ChatSpecKV:
    # Full inference: what the adapter does does not depend on the method (one test runs SpecKV).
    return _chat(tool_target, tool_tokenizer, tool_draft, method="full")


CALL_BLOCK = '<tool_call>\n{"name": "retrieve", "arguments": {"query": "vault"}}\n</tool_call>'


def _rendered(tokenizer: Any, history: list[BaseMessage]) -> str:
    """What the chat template makes of ``history`` with the retrieve tool."""
    messages = chat_module._to_chat(history)
    tools = [convert_to_openai_tool(retrieve)]
    return str(
        tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    )


class _Prefill:
    """Token ids of each prefill the target runs (a forward hook on this one model)."""

    def __init__(self, model: Any) -> None:
        self.inputs: list[list[int]] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1:
            self.inputs.append(ids[0].tolist())

    def close(self) -> None:
        self._handle.remove()


# -- bind_tools: what is bound ---------------------------------------------------------------


def test_bind_tools_converts_every_kind_of_tool_to_openai_dicts(chat: ChatSpecKV) -> None:
    schema = {"title": "Search", "description": "Search the web.", "type": "object",
              "properties": {"q": {"type": "string"}}, "required": ["q"]}  # fmt: skip
    bound = chat.bind_tools([Add, retrieve, lookup, schema, GradeDict])
    tools = bound.kwargs["tools"]  # type: ignore[attr-defined]
    assert [t["function"]["name"] for t in tools] == ["Add", "retrieve", "lookup", "Search", "GradeDict"]
    assert all(t["type"] == "function" for t in tools)
    assert tools[0]["function"]["parameters"]["properties"]["a"] == {
        "maximum": 9,
        "minimum": 0,
        "type": "integer",
    }
    assert tools[1]["function"]["description"] == "Look up documents about a topic."
    assert "tool_choice" not in bound.kwargs  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("choice", "engine_choice"),
    [
        ("auto", None),
        (None, None),
        ("none", "none"),
        ("any", "required"),
        ("required", "required"),
        (True, "required"),
        ("Add", "Add"),
        ({"type": "function", "function": {"name": "retrieve"}}, "retrieve"),
    ],
)
def test_tool_choice_is_passed_to_the_engine_in_its_terms(
    chat: ChatSpecKV, choice: Any, engine_choice: str | None
) -> None:
    bound = chat.bind_tools([Add, retrieve], tool_choice=choice)
    assert bound.kwargs.get("tool_choice") == engine_choice  # type: ignore[attr-defined]


def test_tool_choice_naming_no_bound_tool_fails_with_the_names(chat: ChatSpecKV) -> None:
    with pytest.raises(ValueError, match=r"\(Add, retrieve\)"):
        chat.bind_tools([Add, retrieve], tool_choice="multiply")


def test_template_without_tools_fails_at_bind_naming_the_model_and_the_way_out(
    target: Any, tokenizer: Any, draft: Any
) -> None:
    plain = ChatSpecKV(llm=target, tokenizer=tokenizer, draft_model=draft, draft_tokenizer=tokenizer)
    with pytest.raises(ToolsNotSupportedError, match=r"Qwen2\.5") as err:
        plain.bind_tools([Add])
    assert plain.model_name in str(err.value)
    assert plain.profile is not None and plain.profile["tool_calling"] is False


def test_a_model_given_by_name_is_not_loaded_to_bind_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded by bind_tools")

    monkeypatch.setattr("spec_rag.models.get_model", no_loading)
    chat = ChatSpecKV(model="qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct")
    assert chat.bind_tools([Add], tool_choice="any").kwargs["tool_choice"] == "required"  # type: ignore[attr-defined]
    assert chat.with_structured_output(Grade) is not None


def test_profile_says_tools_where_the_template_renders_them(chat: ChatSpecKV) -> None:
    assert chat.profile is not None
    assert chat.profile["tool_calling"] is True and chat.profile["structured_output"] is True


# -- calls out --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "speckv"])
def test_a_forced_call_comes_back_as_a_tool_call_with_valid_arguments(
    tool_target: Any, tool_tokenizer: Any, tool_draft: Any, method: str
) -> None:
    # SpecKV's budget holds the two tools' template structure (564 tokens), which is never evicted.
    chat = _chat(tool_target, tool_tokenizer, tool_draft, method=method, max_capacity_prompt=640)
    message = chat.bind_tools([Add, retrieve], tool_choice="Add").invoke("What is 2 + 3?")
    assert isinstance(message, AIMessage)
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "Add" and call["type"] == "tool_call"
    Add.model_validate(call["args"])  # the grammar held the random model to the schema
    assert call["id"] and call["id"].startswith("call_")
    assert [b["type"] for b in message.content_blocks if b["type"] == "tool_call"] == ["tool_call"]


def test_required_gives_exactly_one_call_of_a_bound_tool(chat: ChatSpecKV) -> None:
    message = chat.bind_tools([Add, retrieve], tool_choice="any").invoke("Look up the vault.")
    assert [c["name"] in ("Add", "retrieve") for c in message.tool_calls] == [True]


def test_streaming_gives_the_calls_as_tool_call_chunks_in_the_last_chunk(chat: ChatSpecKV) -> None:
    bound = chat.bind_tools([Add], tool_choice="Add")
    invoked = bound.invoke("What is 2 + 3?")
    chunks = list(bound.stream("What is 2 + 3?"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [bool(c.tool_call_chunks) for c in chunks][-1] is True
    assert not any(c.tool_call_chunks for c in chunks[:-1])
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        (c["name"], c["args"]) for c in invoked.tool_calls
    ]
    assert merged.content == invoked.content


async def test_async_streaming_gives_the_same_calls(chat: ChatSpecKV) -> None:
    bound = chat.bind_tools([Add], tool_choice="Add")
    invoked = await bound.ainvoke("What is 2 + 3?")
    merged: Any = None
    async for chunk in bound.astream("What is 2 + 3?"):
        merged = chunk if merged is None else merged + chunk
    assert [c["args"] for c in merged.tool_calls] == [c["args"] for c in invoked.tool_calls]


# -- calls and results in ----------------------------------------------------------------------


def _history(content: Any = "") -> list[BaseMessage]:
    call = {"name": "retrieve", "args": {"query": "vault"}, "id": "call_1", "type": "tool_call"}
    return [
        SystemMessage("Answer from the documents."),
        HumanMessage("What opens the Aurora vault?"),
        AIMessage(content, tool_calls=[call]),
        ToolMessage(FACT, tool_call_id="call_1", name="retrieve"),
    ]


def test_calls_and_results_become_the_templates_message_dicts() -> None:
    chat = chat_module._to_chat(_history())
    assert chat[2:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "retrieve", "arguments": {"query": "vault"}},
                }
            ],
        },
        {"role": "tool", "content": FACT, "tool_call_id": "call_1", "name": "retrieve"},
    ]


def test_tool_use_blocks_of_an_ai_message_are_not_taken_for_text() -> None:
    blocks = [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "retrieve", "input": {"query": "vault"}},
    ]
    assistant = chat_module._to_chat(_history(blocks))[2]
    assert assistant["content"] == "Let me look."
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["retrieve"]


def test_a_tool_result_is_answered_and_its_content_is_in_the_prompt(
    tool_target: Any, tool_tokenizer: Any, tool_draft: Any
) -> None:
    chat = _chat(tool_target, tool_tokenizer, tool_draft, method="full", max_tokens=4)
    prefill = _Prefill(tool_target)
    try:
        answer = chat.bind_tools([retrieve]).invoke(_history())
    finally:
        prefill.close()
    assert isinstance(answer, AIMessage)
    prompt = tool_tokenizer.decode(prefill.inputs[0])
    assert prompt == _rendered(tool_tokenizer, _history())
    assert f"<tool_response>\n{FACT}\n</tool_response>" in prompt
    assert (
        CALL_BLOCK in prompt
        and '"name": "retrieve", "description": "Look up documents about a topic."' in prompt
    )


@pytest.mark.parametrize("method", ["specpc", "speckv-pc"])
def test_prompt_compression_shortens_a_long_tool_result_and_keeps_the_call_structure(
    tool_target: Any, tool_tokenizer: Any, tool_draft: Any, method: str
) -> None:
    documents = " ".join(f"Document {i} is about the garden and its ferns." for i in range(40)) + " " + FACT
    history = _history()
    history[-1] = ToolMessage(documents, tool_call_id="call_1", name="retrieve")
    chat = _chat(tool_target, tool_tokenizer, tool_draft, method="full")
    short_tokens = chat.get_num_tokens_from_messages(_history(), tools=[retrieve])  # one sentence of result
    full_tokens = chat.get_num_tokens_from_messages(history, tools=[retrieve])
    budget = short_tokens + 120  # the structure fits; the forty documents do not
    # SpecKV-PC's cache keeps the structure (no longer than the short prompt) and the window.
    cascade = {"prompt_capacity": budget, "max_capacity_prompt": short_tokens + 16}
    budgets = {"max_capacity_prompt": budget} if method == "specpc" else cascade
    chat = _chat(tool_target, tool_tokenizer, tool_draft, method=method, max_tokens=4, **budgets)
    prefill = _Prefill(tool_target)
    try:
        answer = chat.bind_tools([retrieve]).invoke(history)
    finally:
        prefill.close()
    prompt = tool_tokenizer.decode(prefill.inputs[0])
    stats = answer.response_metadata["spec_rag"]
    assert stats["prompt_tokens"] == full_tokens  # counted with the tools, as the engine reads them
    assert len(prefill.inputs[0]) < full_tokens and stats["target_prefill_tokens"] < full_tokens
    # The tool result was cut, the template's structure around it was not.
    assert "Document 20 is about" not in prompt or "Document 30 is about" not in prompt
    assert CALL_BLOCK + "<|im_end|>" in prompt  # the earlier call, its arguments too
    assert prompt.count("<tool_response>\n") == 1
    assert "\n</tool_response><|im_end|>" in prompt
    # The template's own text is all there: drop the messages' texts from the rendering, and
    # every piece left is in the prompt the target read, in order.
    template_text = _rendered(tool_tokenizer, _history())
    for text in ("Answer from the documents.", "What opens the Aurora vault?", FACT):
        template_text = template_text.replace(text, "\0")
    pieces = [piece for piece in template_text.split("\0") if piece]
    at = 0
    for piece in pieces:
        found = prompt.find(piece, at)
        assert found >= 0, f"the template's text {piece[:60]!r} was cut"
        at = found + len(piece)


def test_counting_tokens_counts_the_tools(chat: ChatSpecKV) -> None:
    messages = [HumanMessage("What is 2 + 3?")]
    assert (
        chat.get_num_tokens_from_messages(messages, tools=[Add])
        > chat.get_num_tokens_from_messages(messages) + 10
    )


# -- structured output --------------------------------------------------------------------------


class _Options(BaseCallbackHandler):
    def __init__(self) -> None:
        self.options: list[Any] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, *, options: Any = None, **kw: Any) -> None:
        self.options.append(options)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_of_a_pydantic_schema_is_an_instance(chat: ChatSpecKV, method: str) -> None:
    callback = _Options()
    grade = chat.with_structured_output(Grade, method=method).invoke(  # type: ignore[arg-type]
        f"Is this relevant to the vault? {FACT}", config={"callbacks": [callback]}
    )
    assert isinstance(grade, Grade)
    assert callback.options[0]["ls_structured_output_format"]["kwargs"] == {"method": method}
    assert callback.options[0]["ls_structured_output_format"]["schema"]["title"] == "Grade"


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
@pytest.mark.parametrize("schema", [GradeDict, Grade.model_json_schema()], ids=["typeddict", "json-schema"])
def test_structured_output_of_a_typeddict_or_json_schema_is_a_dict(
    chat: ChatSpecKV, method: str, schema: Any
) -> None:
    grade = chat.with_structured_output(schema, method=method).invoke("Relevant?")  # type: ignore[arg-type]
    assert (
        isinstance(grade, dict) and grade["binary_score"] in ("yes", "no") and set(grade) == {"binary_score"}
    )


def test_json_schema_method_constrains_the_answer_without_tools(chat: ChatSpecKV) -> None:
    bound = chat.with_structured_output(Grade, method="json_schema").first  # type: ignore[attr-defined]
    assert bound.kwargs["response_format"]["properties"]["binary_score"]["enum"] == ["yes", "no"]
    assert "tools" not in bound.kwargs


def test_json_schema_method_works_with_a_template_without_tools(
    target: Any, tokenizer: Any, draft: Any
) -> None:
    plain = _chat(target, tokenizer, draft)
    assert isinstance(plain.with_structured_output(Grade, method="json_schema").invoke("Relevant?"), Grade)


def test_json_mode_asks_for_any_json_object_or_the_schema_given(chat: ChatSpecKV) -> None:
    bound = chat.with_structured_output(method="json_mode").first  # type: ignore[attr-defined]
    assert bound.kwargs["response_format"] == {"type": "object"}
    typed = chat.with_structured_output(Grade, method="json_mode")
    assert typed.first.kwargs["response_format"] == convert_to_json_schema(Grade)  # type: ignore[attr-defined]
    assert isinstance(typed.invoke("Relevant?"), Grade)


def test_include_raw_gives_the_message_the_parsed_answer_and_no_error(chat: ChatSpecKV) -> None:
    result = chat.with_structured_output(Grade, include_raw=True).invoke("Relevant?")
    assert isinstance(result, dict) and set(result) == {"raw", "parsed", "parsing_error"}
    assert isinstance(result["raw"], AIMessage) and result["raw"].tool_calls[0]["name"] == "Grade"
    assert result["parsed"] == Grade.model_validate(result["raw"].tool_calls[0]["args"])
    assert result["parsing_error"] is None


def test_include_raw_reports_an_answer_cut_short_as_a_parsing_error(
    tool_target: Any, tool_tokenizer: Any, tool_draft: Any
) -> None:
    short = _chat(tool_target, tool_tokenizer, tool_draft, max_tokens=2)
    result = short.with_structured_output(Grade, method="json_schema", include_raw=True).invoke("Relevant?")
    assert isinstance(result, dict) and result["parsed"] is None and result["parsing_error"] is not None
    assert result["raw"].response_metadata["finish_reason"] == "length"


def test_structured_output_refuses_a_missing_schema_and_unknown_methods(chat: ChatSpecKV) -> None:
    with pytest.raises(ValueError, match="needs a schema"):
        chat.with_structured_output(None)
    with pytest.raises(ValueError, match="unknown structured output method"):
        chat.with_structured_output(Grade, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported arguments"):
        chat.with_structured_output(Grade, tools=[])
