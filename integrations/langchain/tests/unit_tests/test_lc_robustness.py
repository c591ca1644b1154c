"""Whatever a retriever or a user hands over, the LangChain adapters give a result or a clear
``ValueError`` (spec-rag's ``InvalidInputError``), never a crash, and stay usable afterwards."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.documents import Document
from langchain_spec_rag import ChatSpecKV, SpecPCCompressor

from spec_rag import InvalidInputError
from spec_rag.testing import NASTY_TEXTS

any_text = st.one_of(st.sampled_from(NASTY_TEXTS), st.text(max_size=200))
examples = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def compressor(draft: Any, tokenizer: Any) -> SpecPCCompressor:
    return SpecPCCompressor(
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=128,
        window_size=8,
        kernel_size=5,
        neighbor_tokens=4,
    )


def _chat(target: Any, tokenizer: Any, draft: Any, **kwargs: Any) -> ChatSpecKV:
    return ChatSpecKV(
        llm=target,
        tokenizer=tokenizer,
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=32,
        window_size=8,
        **kwargs,
    )


@examples
@given(query=any_text, contents=st.lists(any_text, max_size=6))
def test_compressor_gives_kept_documents_or_a_clear_error(
    compressor: SpecPCCompressor, query: str, contents: list[str]
) -> None:
    documents = [Document(page_content=c, id=f"d{i}", metadata={"i": i}) for i, c in enumerate(contents)]
    before = [d.model_copy(deep=True) for d in documents]
    try:
        out = compressor.compress_documents(documents, query)
    except ValueError as err:
        assert isinstance(err, InvalidInputError)
        assert re.search("empty query|query is empty|leaves no room|context window", str(err))
        return
    finally:
        assert documents == before, "inputs must never be modified"
    positions = [int(d.id[1:]) for d in out]  # type: ignore[index]
    assert positions == sorted(set(positions)), "kept documents keep their input order, once each"
    for doc in out:
        stats = doc.metadata["spec_rag"]
        assert 0 < stats["kept_tokens"] <= stats["original_tokens"]
        assert doc.metadata["i"] == int(doc.id[1:])  # type: ignore[index]


@examples
@given(
    content=any_text,
    max_tokens=st.integers(0, 4),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
)
def test_chat_model_answers_or_refuses_any_text(
    target: Any, tokenizer: Any, draft: Any, content: str, max_tokens: int, stop: list[str]
) -> None:
    chat = _chat(target, tokenizer, draft, max_tokens=max_tokens)
    try:
        message = chat.invoke(content, stop=stop or None)
    except ValueError as err:
        assert isinstance(err, InvalidInputError)
        return
    assert isinstance(message.content, str)
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] <= max_tokens
    assert not any(s in message.content for s in stop)


def test_a_refused_call_leaves_both_adapters_answering_as_before(
    compressor: SpecPCCompressor, target: Any, tokenizer: Any, draft: Any
) -> None:
    documents = [Document(page_content=NASTY_TEXTS[2] + " " + NASTY_TEXTS[3] * 20, id="a")]
    chat = _chat(target, tokenizer, draft, max_tokens=6)
    first = (compressor.compress_documents(documents, "flags?"), chat.invoke("Name a flag.").content)
    with pytest.raises(ValueError, match="empty"):
        compressor.compress_documents(documents, " ")
    with pytest.raises(ValueError):
        chat.invoke([])
    assert (compressor.compress_documents(documents, "flags?"), chat.invoke("Name a flag.").content) == first
