"""SpecKVLLM and LangChain's ChatSpecKV follow one set of rules (both come from spec_rag.adapters)."""

from __future__ import annotations

from typing import Any

import pytest
from li_llm_support import tiny_model, tiny_tokenizer
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.llms.spec_rag import SpecKVLLM

langchain_spec_rag = pytest.importorskip("langchain_spec_rag")
ChatSpecKV = langchain_spec_rag.ChatSpecKV

BAD = [
    {"model": "t"},
    {"model": "t", "llm": object(), "tokenizer": object()},
    {"llm": object()},
    {"model": "t", "draft": "d", "draft_model": object()},
    {"model": "t", "draft": "d", "method": "magic"},
    {"model": "t", "draft": "d", "prompt_capacity": 9},
    {"model": "t", "method": "snapkv", "lookahead_tokens": 3},
    {"model": "t", "draft": "d", "max_capacity_prompt": 16},
]


def _message(cls: type, kwargs: dict[str, Any]) -> str:
    """The error's own sentence, without pydantic's wrapping and with the class name neutral."""
    with pytest.raises(ValueError) as error:
        cls(**kwargs)
    lines = [line.strip() for line in str(error.value).splitlines()]
    lines = [
        line for line in lines if line and "validation error" not in line and "errors.pydantic" not in line
    ]
    sentence = max(lines, key=len).removeprefix("Value error, ").split(" [type=")[0]
    return sentence.replace(cls.__name__, "<adapter>")


@pytest.mark.parametrize("kwargs", BAD, ids=[str(sorted(k)) for k in BAD])
def test_the_same_mistake_gets_the_same_message(kwargs: dict[str, Any]) -> None:
    assert _message(ChatSpecKV, kwargs) == _message(SpecKVLLM, kwargs)


def test_the_same_defaults_and_limits() -> None:
    lc, li = ChatSpecKV(), SpecKVLLM()
    assert (lc.model, lc.draft, lc.method) == (li.model, li.draft, li.method)
    assert ChatSpecKV(model="smollm2-135m-instruct", method="full", max_tokens=0).max_tokens == 0
    assert SpecKVLLM(model="smollm2-135m-instruct", method="full", max_new_tokens=0).max_new_tokens == 0
    for cls, name in ((ChatSpecKV, "max_tokens"), (SpecKVLLM, "max_new_tokens")):
        with pytest.raises(ValueError):
            cls(model="smollm2-135m-instruct", method="full", **{name: -1})
    for cls in (ChatSpecKV, SpecKVLLM):
        with pytest.raises(ValueError):
            cls(model="smollm2-135m-instruct", method="full", window_size=-1)
        with pytest.raises(ValueError):
            cls(model="smollm2-135m-instruct", method="full", max_capacity_prompt=0)


def test_both_streams_end_on_text_that_carries_the_usage() -> None:
    tokenizer = tiny_tokenizer()
    target = tiny_model(tokenizer, seed=1, layers=3)
    common = {"llm": target, "tokenizer": tokenizer, "method": "full"}
    prompt = "Tell me about the observatory on Hill Street."
    lc = list(ChatSpecKV(max_tokens=8, **common).stream(prompt))
    li = list(
        SpecKVLLM(max_new_tokens=8, **common).stream_chat(
            [ChatMessage(role=MessageRole.USER, content=prompt)]
        )
    )
    assert [c.content for c in lc] == [r.delta for r in li]
    assert lc[-1].content and lc[-1].usage_metadata is not None and lc[-1].chunk_position == "last"
    assert li[-1].raw["usage"]["completion_tokens"] == lc[-1].usage_metadata["output_tokens"]
    assert all(r.raw is None or not r.raw for r in li[:-1])


def test_no_messages_says_so() -> None:
    tokenizer = tiny_tokenizer()
    common = {"llm": tiny_model(tokenizer, seed=1, layers=3), "tokenizer": tokenizer, "method": "full"}
    with pytest.raises(ValueError, match="ChatSpecKV got no messages"):
        ChatSpecKV(**common).invoke([])
    with pytest.raises(ValueError, match="SpecKVLLM got no messages"):
        SpecKVLLM(**common).chat([])
