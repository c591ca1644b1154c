"""ChatSpecKV counts tokens with the target's own tokenizer and chat template (no download), so
LangChain's message trimming and LangGraph memory management trim what the model reads."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, trim_messages
from langchain_spec_rag import ChatSpecKV

HISTORY: list[BaseMessage] = [
    SystemMessage("Answer from the notes."),
    *[
        message
        for i in range(6)
        for message in (
            HumanMessage(f"Note {i}: the ferry leaves Pier {i} at {i + 6} in the morning."),
            AIMessage(f"Noted: Pier {i}, {i + 6} o'clock."),
        )
    ],
    HumanMessage("When does the ferry leave Pier 5?"),
]


@pytest.fixture
def chat(target: Any, tokenizer: Any) -> ChatSpecKV:
    return ChatSpecKV(llm=target, tokenizer=tokenizer, method="full", max_tokens=4)


def _template_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_counts_are_the_chat_template_tokens(chat: ChatSpecKV, tokenizer: Any) -> None:
    messages = [SystemMessage("Be brief."), HumanMessage("Where is the vault?")]
    expected = _template_tokens(
        tokenizer,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the vault?"}],
    )
    assert chat.get_num_tokens_from_messages(messages) == expected
    assert chat.get_num_tokens("Where is the vault?") == len(tokenizer.encode("Where is the vault?"))
    assert chat.get_token_ids("vault") == tokenizer.encode("vault", add_special_tokens=False)


def test_the_prompt_tokens_of_an_answer_are_the_count(chat: ChatSpecKV) -> None:
    answer = chat.invoke(HISTORY)
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["input_tokens"] == chat.get_num_tokens_from_messages(HISTORY)


def test_trim_messages_with_the_model_as_counter_trims(chat: ChatSpecKV) -> None:
    total = chat.get_num_tokens_from_messages(HISTORY)
    budget = total // 2
    trimmed = trim_messages(
        HISTORY, max_tokens=budget, token_counter=chat, strategy="last", include_system=True, start_on="human"
    )
    assert 2 <= len(trimmed) < len(HISTORY)
    assert trimmed[0] == HISTORY[0] and trimmed[-1] == HISTORY[-1]
    assert chat.get_num_tokens_from_messages(trimmed) <= budget


def test_counting_needs_no_network_and_logs_no_fallback(
    chat: ChatSpecKV, caplog: pytest.LogCaptureFixture
) -> None:
    # Sockets are disabled in the unit tests: LangChain's GPT-2 fallback could not even start.
    with caplog.at_level(logging.WARNING):
        assert chat.get_num_tokens_from_messages(HISTORY) > 0
    assert not caplog.records


def test_langgraph_messages_state_trims_its_memory(chat: ChatSpecKV) -> None:
    langgraph = pytest.importorskip("langgraph")
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph

    assert langgraph is not None
    budget = chat.get_num_tokens_from_messages(HISTORY) // 2
    seen: list[int] = []

    def call_model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        window = trim_messages(
            state["messages"], max_tokens=budget, token_counter=chat, strategy="last", start_on="human"
        )
        seen.append(chat.get_num_tokens_from_messages(window))
        return {"messages": [chat.invoke(window)]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_edge(START, "model")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "1"}}
    graph.invoke({"messages": HISTORY}, config)
    state = graph.invoke({"messages": [HumanMessage("And Pier 4?")]}, config)
    assert len(state["messages"]) == len(HISTORY) + 3  # the memory keeps everything
    assert len(seen) == 2 and all(0 < n <= budget for n in seen)  # the model saw a trimmed window
