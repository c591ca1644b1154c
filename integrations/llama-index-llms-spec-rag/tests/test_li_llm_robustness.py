"""Whatever a query engine hands over, SpecKVLLM answers or raises a clear ``ValueError``
(spec-rag's ``InvalidInputError``), never crashes, and stays usable afterwards."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from li_llm_support import tiny_model, tiny_tokenizer
from llama_index.core.llms import ChatMessage
from llama_index.llms.spec_rag import SpecKVLLM

from spec_rag import InvalidInputError
from spec_rag.testing import NASTY_TEXTS

any_text = st.one_of(st.sampled_from(NASTY_TEXTS), st.text(max_size=200))
examples = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def llm() -> SpecKVLLM:
    tokenizer = tiny_tokenizer()
    return SpecKVLLM(
        llm=tiny_model(tokenizer, seed=1, layers=3),
        tokenizer=tokenizer,
        draft_model=tiny_model(tokenizer, seed=2),
        max_capacity_prompt=32,
        window_size=8,
        max_new_tokens=4,
    )


@examples
@given(
    prompt=any_text,
    formatted=st.booleans(),
    max_tokens=st.integers(0, 4),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
)
def test_complete_answers_or_refuses_any_text(
    llm: SpecKVLLM, prompt: str, formatted: bool, max_tokens: int, stop: list[str]
) -> None:
    try:
        response = llm.complete(prompt, formatted=formatted, max_tokens=max_tokens, stop=stop)
    except ValueError as err:
        assert isinstance(err, InvalidInputError)
        assert (formatted and not prompt.strip()) or "no tokens" in str(err) or "empty" in str(err)
        return
    assert response.raw["usage"]["completion_tokens"] <= max_tokens
    assert not any(s in response.text for s in stop)


@examples
@given(contents=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), any_text), max_size=4))
def test_chat_answers_or_refuses_any_messages(llm: SpecKVLLM, contents: list[tuple[str, str]]) -> None:
    messages = [ChatMessage(role=role, content=text) for role, text in contents]
    try:
        response = llm.chat(messages)
    except ValueError as err:
        assert isinstance(err, InvalidInputError)
        return
    assert isinstance(response.message.content, str)
    assert response.raw["usage"]["completion_tokens"] <= 4


def test_a_refused_call_leaves_the_llm_answering_as_before(llm: SpecKVLLM) -> None:
    first = llm.complete("Name a loop statement.").text
    with pytest.raises(ValueError):
        llm.complete("   ", formatted=True)
    with pytest.raises(ValueError):
        llm.chat([])
    assert llm.complete("Name a loop statement.").text == first
