"""SpecKVLLM as a FunctionCallingLLM, and its structured output, on tiny random models.

A random model never chooses to call a tool, so the calls here are forced (``tool_required`` or
``tool_choice=<name>``), which the engine's grammar makes well-formed; what is checked is that
the adapter sends the tools and messages the engine would get, and brings the engine's calls
and JSON back in LlamaIndex's types.
"""

from __future__ import annotations

import asyncio
import json
from enum import StrEnum
from typing import Literal

import pytest
from li_llm_support import TOWN_DOCUMENTS, tiny_model, tiny_tokenizer, tiny_tools_tokenizer
from llama_index.core.base.llms.types import TextBlock, ToolCallBlock
from llama_index.core.llms import ChatMessage, ChatResponse, MessageRole
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.program.function_program import get_function_tool
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.spec_rag import SpecKVLLM
from llama_index.llms.spec_rag.base import _message_dicts
from pydantic import BaseModel, Field

from spec_rag import SpecEngine, SpecKVConfig
from spec_rag.errors import InvalidInputError
from spec_rag.tools import ToolsNotSupportedError

NEW_TOKENS = 96
#: Holds the longest prompt's tool structure (723 tokens: tools, earlier calls, tags), never evicted.
KV = SpecKVConfig(max_capacity_prompt=768, window_size=8)
QUESTION = "What is the access code for the Aurora vault?"


def search_documents(query: str) -> str:
    """Search the town's documents and return the passages about the query."""
    return "\n".join(doc for doc in TOWN_DOCUMENTS if any(w in doc.lower() for w in query.lower().split()))


def town_hall_hours(day: str, late: bool = False) -> str:
    """Opening hours of the town hall on a day of the week."""
    return f"{day}: 9-{'20' if late else '17'}"


# Bounded arguments, so a random model's forced call ends within the token budget.
class SearchArgs(BaseModel):
    query: str = Field(max_length=16, description="What to search for.")


class HoursArgs(BaseModel):
    day: Literal["monday", "friday"]
    late: bool = False


SEARCH = FunctionTool.from_defaults(fn=search_documents, fn_schema=SearchArgs)
HOURS = FunctionTool.from_defaults(fn=town_hall_hours, fn_schema=HoursArgs)


class Colour(StrEnum):
    red = "red"
    green = "green"


class Vault(BaseModel):
    """A vault and its access code (short strings, so a random model's answer fits the budget)."""

    name: str = Field(max_length=8)
    code: int = Field(ge=0, le=9999)
    colour: Colour
    guards: list[Literal["ann", "bo"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def models():
    tokenizer = tiny_tools_tokenizer()
    return tiny_model(tokenizer, seed=1, layers=3), tiny_model(tokenizer, seed=2), tokenizer


@pytest.fixture(scope="module")
def engine(models) -> SpecEngine:
    target, draft, tokenizer = models
    return SpecEngine(target, tokenizer, draft, config=KV)


@pytest.fixture
def llm(models) -> SpecKVLLM:
    target, draft, tokenizer = models
    return SpecKVLLM(
        llm=target,
        tokenizer=tokenizer,
        draft_model=draft,
        max_new_tokens=NEW_TOKENS,
        max_capacity_prompt=KV.max_capacity_prompt,
        window_size=8,
    )


def _specs(*tools: FunctionTool) -> list[dict]:
    return [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _calls(llm: SpecKVLLM, response: ChatResponse) -> list[tuple[str, dict]]:
    """A response's calls without their ids (fresh per call when the model writes none)."""
    return [(s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(response)]


# -- tools -----------------------------------------------------------------------------------
def test_is_a_function_calling_llm_when_the_template_renders_tools(llm):
    assert isinstance(llm, FunctionCallingLLM)
    assert llm.metadata.is_function_calling_model is True


def test_a_forced_call_is_the_engines_call_as_a_tool_call_block(llm, engine):
    response = llm.chat_with_tools([SEARCH, HOURS], QUESTION, tool_required=True)
    expected = engine.generate(
        _user(QUESTION), tools=_specs(SEARCH, HOURS), tool_choice="required", max_new_tokens=NEW_TOKENS
    )
    assert len(expected.tool_calls) == 1
    (call,) = expected.tool_calls
    blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert [(b.tool_name, b.tool_kwargs) for b in blocks] == [(call.name, call.arguments)]
    (selection,) = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == (call.name, call.arguments)
    # the model writes no id, so each call gets a fresh one, the same in the blocks and kwargs
    assert selection.tool_id == blocks[0].tool_call_id and selection.tool_id.startswith("call_")
    assert response.message.additional_kwargs["tool_calls"] == [
        {
            "id": selection.tool_id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
    ]
    assert "<tool_call>" not in (response.message.content or "")


def test_tool_choice_by_name_calls_that_tool_with_arguments_of_its_schema(llm):
    response = llm.chat_with_tools([SEARCH, HOURS], QUESTION, tool_choice="town_hall_hours")
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "town_hall_hours"
    assert selection.tool_kwargs["day"] in ("monday", "friday")
    assert set(selection.tool_kwargs) <= {"day", "late"}
    assert HOURS(**selection.tool_kwargs).is_error is False


def test_predict_and_call_runs_the_chosen_tool(llm):
    output = llm.predict_and_call([SEARCH], QUESTION, tool_required=True)
    (source,) = output.sources
    assert source.tool_name == "search_documents"
    assert output.response == search_documents(**source.raw_input["kwargs"])


def test_a_stream_with_tools_ends_with_the_calls_of_the_plain_chat(llm):
    plain = llm.chat_with_tools([SEARCH, HOURS], QUESTION, tool_required=True)
    chunks = list(llm.stream_chat_with_tools([SEARCH, HOURS], QUESTION, tool_required=True))
    assert _calls(llm, chunks[-1]) == _calls(llm, plain)
    assert all(not llm.get_tool_calls_from_response(c, error_on_no_tool_call=False) for c in chunks[:-1])
    assert "".join(c.delta or "" for c in chunks) == (plain.message.content or "")


def test_async_chat_with_tools_gives_the_sync_calls(llm):
    plain = llm.chat_with_tools([SEARCH], QUESTION, tool_required=True)
    response = asyncio.run(llm.achat_with_tools([SEARCH], QUESTION, tool_required=True))
    assert _calls(llm, response) == _calls(llm, plain)


def test_the_callers_chat_history_is_left_as_it_was(llm):
    history = [ChatMessage(role="system", content="Use the tools.")]
    llm.chat_with_tools([SEARCH], QUESTION, chat_history=history, tool_required=True)
    assert [m.content for m in history] == ["Use the tools."]


def test_tool_calls_and_results_reach_the_template_as_its_message_dicts(llm, engine):
    call = ToolCallBlock(tool_call_id="call_1", tool_name="search_documents", tool_kwargs={"query": "Aurora"})
    result = search_documents("Aurora vault")
    history = [
        ChatMessage(role="user", content=QUESTION),
        ChatMessage(role="assistant", blocks=[call]),
        ChatMessage(role="tool", content=result, additional_kwargs={"tool_call_id": "call_1"}),
    ]
    dicts = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search_documents", "arguments": {"query": "Aurora"}},
                }
            ],
        },
        {"role": "tool", "content": result, "tool_call_id": "call_1", "name": "search_documents"},
    ]
    assert _message_dicts(history) == dicts
    expected = engine.generate(dicts, tools=_specs(SEARCH), max_new_tokens=NEW_TOKENS)
    response = llm.chat_with_tools([SEARCH], chat_history=history)
    assert response.message.content == expected.text
    assert response.raw["spec_rag"]["prompt_tokens"] == expected.stats.prompt_tokens


def test_openai_style_tool_calls_in_additional_kwargs_convert_like_blocks():
    as_blocks = ChatMessage(
        role="assistant", blocks=[ToolCallBlock(tool_call_id="c", tool_name="f", tool_kwargs={"x": 1})]
    )
    as_kwargs = ChatMessage(
        role="assistant",
        content="",
        additional_kwargs={
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ]
        },
    )
    assert _message_dicts([as_kwargs]) == _message_dicts([as_blocks])


def test_without_parallel_calls_only_the_first_is_kept(llm):
    blocks = [
        TextBlock(text="two calls"),
        *(ToolCallBlock(tool_call_id=i, tool_name="f") for i in ("a", "b")),
    ]
    message = ChatMessage(
        role="assistant", blocks=blocks, additional_kwargs={"tool_calls": [{"id": "a"}, {"id": "b"}]}
    )
    response = llm._validate_chat_with_tools_response(ChatResponse(message=message), [SEARCH])
    assert [s.tool_id for s in llm.get_tool_calls_from_response(response)] == ["a"]
    assert response.message.additional_kwargs["tool_calls"] == [{"id": "a"}]
    assert response.message.content == "two calls"


def test_no_tool_call_raises_unless_told_not_to(llm):
    response = ChatResponse(message=ChatMessage(role="assistant", content="The code is 7319."))
    with pytest.raises(ValueError, match=r"0 tool calls.*7319.*tool_required=True"):
        llm.get_tool_calls_from_response(response)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []


def test_a_tool_choice_that_names_no_given_tool_is_refused(llm):
    with pytest.raises(InvalidInputError, match=r"'lookup'.*search_documents, town_hall_hours"):
        llm.chat_with_tools([SEARCH, HOURS], QUESTION, tool_choice="lookup")


def test_the_function_agent_calls_the_tool_and_answers(llm):
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

    agent = FunctionAgent(tools=[SEARCH], llm=llm, initial_tool_choice="search_documents")

    async def run() -> tuple[list[ToolCallResult], str]:
        handler = agent.run(user_msg=QUESTION)
        results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
        return results, str(await handler)

    results, answer = asyncio.run(run())
    assert results and results[0].tool_name == "search_documents"
    assert results[0].tool_output.content == search_documents(**results[0].tool_kwargs)
    assert isinstance(answer, str)


# -- a template without tools ------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_llm() -> SpecKVLLM:
    tokenizer = tiny_tokenizer()  # plain ChatML: no tools in its template
    target = tiny_model(tokenizer, seed=1)
    return SpecKVLLM(llm=target, tokenizer=tokenizer, method="full", max_new_tokens=NEW_TOKENS)


def test_a_template_without_tools_is_not_function_calling_and_says_so(plain_llm):
    assert plain_llm.metadata.is_function_calling_model is False
    with pytest.raises(
        ToolsNotSupportedError, match=r"chat template of .* has no tool support.*qwen2.5-coder"
    ):
        plain_llm.chat_with_tools([SEARCH], QUESTION)


# -- structured output -----------------------------------------------------------------------
VAULT_PROMPT = PromptTemplate("Describe the vault in this text as JSON: {text}")


def test_structured_predict_returns_the_engines_constrained_json_as_the_model(llm, engine):
    vault = llm.structured_predict(Vault, VAULT_PROMPT, text=TOWN_DOCUMENTS[0])
    messages = _user(VAULT_PROMPT.format(text=TOWN_DOCUMENTS[0]))
    expected = engine.generate(messages, response_format=Vault, max_new_tokens=NEW_TOKENS)
    assert isinstance(vault, Vault)
    assert vault == Vault.model_validate_json(expected.text)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_structured_output_validates_also_when_sampled_and_without_tools(plain_llm, seed):
    vault = plain_llm.structured_predict(
        Vault, VAULT_PROMPT, llm_kwargs={"temperature": 1.0, "seed": seed}, text="x"
    )
    assert isinstance(vault, Vault)


def test_async_and_structured_llm_give_the_same_instance(llm):
    vault = llm.structured_predict(Vault, VAULT_PROMPT, text=TOWN_DOCUMENTS[0])
    assert asyncio.run(llm.astructured_predict(Vault, VAULT_PROMPT, text=TOWN_DOCUMENTS[0])) == vault
    structured = llm.as_structured_llm(Vault)
    response = structured.chat(
        [ChatMessage(role="user", content=VAULT_PROMPT.format(text=TOWN_DOCUMENTS[0]))]
    )
    assert response.raw == vault
    assert json.loads(response.message.content) == vault.model_dump(mode="json")


def test_stream_structured_predict_ends_with_the_instance(llm):
    vault = llm.structured_predict(Vault, VAULT_PROMPT, text=TOWN_DOCUMENTS[0])
    parts = list(llm.stream_structured_predict(Vault, VAULT_PROMPT, text=TOWN_DOCUMENTS[0]))
    assert parts[-1] == vault


class Code(BaseModel):
    """An access code."""

    code: int = Field(ge=0, le=9999)
    vault: Literal["aurora", "harbour"]


@pytest.mark.parametrize(
    "output_cls",
    [Code, Vault],  # Vault's enum sits under "$defs": the call grammar must resolve its refs
)
def test_function_program_mode_goes_through_a_forced_tool_call(models, output_cls):
    target, draft, tokenizer = models
    llm = SpecKVLLM(
        llm=target,
        tokenizer=tokenizer,
        draft_model=draft,
        max_new_tokens=NEW_TOKENS,
        pydantic_program_mode="function",
    )
    prompt = llm._extend_messages(VAULT_PROMPT.format_messages(llm=llm, text=TOWN_DOCUMENTS[0]))
    result = llm.structured_predict(output_cls, VAULT_PROMPT, text=TOWN_DOCUMENTS[0])
    assert isinstance(result, output_cls)
    # it is the forced call of the output class's tool, not constrained JSON content
    expected = llm._get_engine().generate(
        _message_dicts(prompt),
        tools=_specs(get_function_tool(output_cls)),
        tool_choice="required",
        max_new_tokens=NEW_TOKENS,
    )
    assert result == output_cls(**expected.tool_calls[0].arguments)


def test_an_answer_cut_at_the_token_limit_says_to_raise_it(llm):
    with pytest.raises(ValueError, match=r"token limit.*max_new_tokens"):
        llm.structured_predict(Vault, VAULT_PROMPT, llm_kwargs={"max_new_tokens": 3}, text="x")


def test_an_unknown_role_message_is_not_needed_for_tool_results():
    # MessageRole.FUNCTION (the older name for a tool result) is a tool message for the template.
    message = ChatMessage(role=MessageRole.FUNCTION, content="17", additional_kwargs={"tool_call_id": "c"})
    assert _message_dicts([message]) == [{"role": "tool", "content": "17", "tool_call_id": "c"}]
