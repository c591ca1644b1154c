"""Specification of ChatSpecKV (tiny random models: behaviour of the adapter, not quality)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import langchain_spec_rag.chat_models as chat_module
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_spec_rag import ChatSpecKV

from spec_rag import InputTooLargeError, SpecEngine, SpecKVConfig
from spec_rag.adapters import LazyEngine

PROMPT = "Explain what a class definition binds, in one line."
LONG_PROMPT = "Summarise this passage.\n\n" + " ".join(["A class definition binds the class name."] * 30)


@pytest.fixture
def chat(target: Any, tokenizer: Any, draft: Any) -> ChatSpecKV:
    return ChatSpecKV(
        llm=target,
        tokenizer=tokenizer,
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=64,
        window_size=8,
        max_tokens=12,
    )


def _engine_answer(target: Any, tokenizer: Any, draft: Any, prompt: str, max_new_tokens: int = 12) -> str:
    engine = SpecEngine(
        target, tokenizer, draft, tokenizer, SpecKVConfig(max_capacity_prompt=64, window_size=8)
    )
    generation = engine.generate([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
    return generation.text  # type: ignore[union-attr]


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# -- construction -----------------------------------------------------------------------------


def test_construction_loads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded at construction")

    monkeypatch.setattr(chat_module.SpecEngine, "from_pretrained", no_loading)
    chat = ChatSpecKV(
        model="qwen2.5-coder-1.5b-instruct",
        draft="qwen2.5-coder-0.5b-instruct",
        max_tokens=100,
        timeout=60,
        max_retries=2,
        api_key="x",
    )
    assert chat.model_name == "qwen2.5-coder-1.5b-instruct" and chat.method == "speckv-pc"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "t", "llm": object(), "tokenizer": object()}, "one target model"),
        ({"model": "t"}, "needs a draft model"),
        ({"model": "t", "draft": "d", "method": "magic"}, "unknown method"),
        ({"model": "t", "draft": "d", "method": "speckv", "prompt_capacity": 512}, "only|speckv-pc"),
        ({"model": "t", "draft": "d", "max_capacity_prompt": 16}, "Raise max_capacity_prompt"),
        ({"llm": object()}, "llm and tokenizer go together"),
    ],
    ids=["two-targets", "speckv-without-draft", "unknown-method", "prompt-capacity", "budget", "llm-alone"],
)
def test_invalid_configuration_fails_at_construction_with_the_fix(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ChatSpecKV(**kwargs)


def test_methods_without_a_draft_need_none() -> None:
    for method in ("full", "snapkv", "streamingllm"):
        assert ChatSpecKV(model="smollm2-135m-instruct", method=method).method == method


def test_method_names_are_normalised() -> None:
    assert (
        ChatSpecKV(model="smollm2-135m-instruct", draft="smollm2-135m-instruct", method="SpecKV_PC").method
        == "speckv-pc"
    )


def test_max_new_tokens_is_an_alias_of_max_tokens() -> None:
    assert ChatSpecKV(model="smollm2-135m-instruct", method="full", max_new_tokens=7).max_tokens == 7


def test_engine_fixes_the_method(target: Any, tokenizer: Any, draft: Any) -> None:
    engine = SpecEngine(
        target, tokenizer, draft, tokenizer, SpecKVConfig(max_capacity_prompt=64, window_size=8)
    )
    assert ChatSpecKV(engine=engine).method == "speckv"
    full = ChatSpecKV(engine=engine, method="full", max_tokens=6)
    assert full.method == "full"
    assert (
        full.invoke(PROMPT).content
        == engine.with_config(None).generate([{"role": "user", "content": PROMPT}], max_new_tokens=6).text
    )


def test_profile_declares_text_only_and_no_tools_for_a_template_without_them(chat: ChatSpecKV) -> None:
    assert chat.profile is not None
    assert chat.profile["tool_calling"] is False and chat.profile["image_inputs"] is False


# -- invoke -----------------------------------------------------------------------------------


def test_invoke_answers_like_the_engine(chat: ChatSpecKV, target: Any, tokenizer: Any, draft: Any) -> None:
    answer = chat.invoke(PROMPT)
    assert isinstance(answer, AIMessage)
    assert answer.content == _engine_answer(target, tokenizer, draft, PROMPT)


def test_lookahead_tokens_reach_the_engine(target: Any, tokenizer: Any, draft: Any) -> None:
    chat = ChatSpecKV(
        llm=target,
        tokenizer=tokenizer,
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=64,
        window_size=8,
        lookahead_tokens=3,
        max_tokens=12,
    )
    answer = chat.invoke(LONG_PROMPT)
    assert answer.response_metadata["spec_rag"]["lookahead_tokens"] == 3
    engine = SpecEngine(
        target,
        tokenizer,
        draft,
        tokenizer,
        SpecKVConfig(max_capacity_prompt=64, window_size=8, lookahead_tokens=3),
    )
    expected = engine.generate([{"role": "user", "content": LONG_PROMPT}], max_new_tokens=12)
    assert answer.content == expected.text  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no draft lookahead"):
        ChatSpecKV(llm=target, tokenizer=tokenizer, method="snapkv", lookahead_tokens=3)


def test_invoke_reports_usage_and_spec_rag_stats(chat: ChatSpecKV) -> None:
    answer = chat.invoke(LONG_PROMPT)
    stats = answer.response_metadata["spec_rag"]
    assert stats["method"] == "speckv-pc"  # the default method
    assert stats["kv_cache_tokens"] == 64 < stats["prompt_tokens"]
    assert answer.usage_metadata == {
        "input_tokens": stats["prompt_tokens"],
        "output_tokens": stats["output_tokens"],
        "total_tokens": stats["prompt_tokens"] + stats["output_tokens"],
    }
    assert answer.response_metadata["finish_reason"] in {"stop", "length"}
    assert answer.response_metadata["model_name"]


def test_messages_map_to_chat_roles(monkeypatch: pytest.MonkeyPatch, chat: ChatSpecKV) -> None:
    seen: list[Any] = []
    real_generate = SpecEngine.generate

    def spy(self: SpecEngine, prompt: Any, **kwargs: Any) -> Any:
        seen.append(prompt)
        return real_generate(self, prompt, **kwargs)

    monkeypatch.setattr(SpecEngine, "generate", spy)
    chat.invoke([SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage("Why?")])
    assert seen == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Why?"},
        ]
    ]


def test_text_content_blocks_are_joined(chat: ChatSpecKV) -> None:
    blocks = HumanMessage(
        content=[{"type": "text", "text": PROMPT[:20]}, {"type": "text", "text": PROMPT[20:]}]
    )
    assert chat.invoke([blocks]).content == chat.invoke(PROMPT).content


def test_non_text_inputs_are_refused(chat: ChatSpecKV) -> None:
    image = HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}])
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([image])
    with pytest.raises(ValueError, match="FunctionMessage"):
        chat.invoke([HumanMessage("hi"), FunctionMessage("42", name="f")])
    with pytest.raises(ValueError, match="text only"):
        chat.invoke(
            [HumanMessage("hi"), ToolMessage([{"type": "image", "url": "https://x/a.png"}], tool_call_id="1")]
        )


def test_stop_strings_of_instance_and_call_both_apply(chat: ChatSpecKV) -> None:
    full = str(chat.invoke(PROMPT).content)
    assert len(full) > 4, "the tiny model must say something for this test to mean anything"
    cut = full[len(full) // 2 :][:2]
    expected = full[: full.index(cut)]
    assert chat.invoke(PROMPT, stop=[cut]).content == expected
    assert chat.model_copy(update={"stop": [cut]}).invoke(PROMPT).content == expected
    assert chat.invoke(PROMPT, stop=[]).content == full


def test_call_options_override_the_instance(chat: ChatSpecKV) -> None:
    answer = chat.invoke(PROMPT, max_tokens=3)
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] <= 3


def test_unknown_call_options_are_refused(chat: ChatSpecKV) -> None:
    with pytest.raises(ValueError, match="unsupported call options"):
        chat.invoke(PROMPT, frequency_penalty=0.5)


def test_switching_model_per_call_is_refused(chat: ChatSpecKV) -> None:
    with pytest.raises(ValueError, match="cannot switch"):
        chat.invoke(PROMPT, model="another-model")


def test_sampling_with_a_seed_is_reproducible(chat: ChatSpecKV) -> None:
    first = chat.invoke(PROMPT, temperature=1.0, seed=3).content
    assert chat.invoke(PROMPT, temperature=1.0, seed=3).content == first


# -- streaming --------------------------------------------------------------------------------


def test_stream_yields_deltas_that_add_up_to_the_answer(chat: ChatSpecKV) -> None:
    chunks = list(chat.stream(PROMPT))
    assert len(chunks) > 2
    assert "".join(str(c.content) for c in chunks) == chat.invoke(PROMPT).content


def test_only_the_last_chunk_is_marked_and_carries_usage(chat: ChatSpecKV) -> None:
    chunks = list(chat.stream(LONG_PROMPT))
    *body, last = chunks
    assert last.chunk_position == "last"
    assert last.usage_metadata is not None and last.response_metadata["spec_rag"]["kv_cache_tokens"] == 64
    assert all(c.chunk_position is None and c.usage_metadata is None for c in body)
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert isinstance(merged, AIMessageChunk)
    assert merged.usage_metadata == last.usage_metadata
    assert merged.response_metadata["model_name"] == chat.model_name


def test_stream_applies_stop_strings(chat: ChatSpecKV) -> None:
    full = str(chat.invoke(PROMPT).content)
    cut = full[len(full) // 2 :][:2]
    assert "".join(str(c.content) for c in chat.stream(PROMPT, stop=[cut])) == full[: full.index(cut)]


def test_stream_reports_each_token_to_callbacks(chat: ChatSpecKV) -> None:
    handler = _Tokens()
    text = "".join(str(c.content) for c in chat.stream(PROMPT, config={"callbacks": [handler]}))
    assert "".join(handler.tokens) == text


def test_streaming_instance_streams_inside_invoke(chat: ChatSpecKV) -> None:
    handler = _Tokens()
    streaming = ChatSpecKV(**_same_models(chat), streaming=True)
    answer = streaming.invoke(PROMPT, config={"callbacks": [handler]})
    assert len(handler.tokens) > 2 and "".join(handler.tokens) == answer.content
    assert answer.usage_metadata is not None


@pytest.mark.asyncio
async def test_astream_matches_stream(chat: ChatSpecKV) -> None:
    chunks = [c async for c in chat.astream(PROMPT)]
    assert [c.content for c in chunks] == [c.content for c in chat.stream(PROMPT)]
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata is not None


@pytest.mark.asyncio
async def test_astream_leaves_the_event_loop_free(chat: ChatSpecKV) -> None:
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    chunks = [c async for c in chat.astream(PROMPT)]
    done.set()
    await task
    assert ticks > len(chunks), "the loop ran only between chunks: decoding blocked it"


@pytest.mark.asyncio
async def test_ainvoke_matches_invoke(chat: ChatSpecKV) -> None:
    assert (await chat.ainvoke(PROMPT)).content == chat.invoke(PROMPT).content


@pytest.mark.asyncio
async def test_leaving_astream_early_stops_generation(chat: ChatSpecKV) -> None:
    stream = chat.astream(PROMPT)
    first = await anext(stream)
    await stream.aclose()
    assert first.content


# -- sharing ----------------------------------------------------------------------------------


def test_eight_threads_on_one_instance_get_the_answer_each_would_alone(chat: ChatSpecKV) -> None:
    prompts = [
        PROMPT,
        LONG_PROMPT,
        "What is a decorator?",
        "Name a loop statement.",
        LONG_PROMPT.replace("class", "function"),
        "Why use a context manager?",
        "What does yield return?",
        LONG_PROMPT[:300],
    ]
    alone = [ChatSpecKV(**_same_models(chat)).invoke(p).content for p in prompts]
    together: dict[int, Any] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        barrier.wait()
        together[i] = chat.invoke(prompts[i]).content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(prompts))] == alone


def test_the_engine_is_built_once_across_threads(monkeypatch: pytest.MonkeyPatch, chat: ChatSpecKV) -> None:
    builds: list[int] = []
    real_build = LazyEngine._build

    def counting(self: LazyEngine) -> SpecEngine:
        builds.append(1)
        return real_build(self)

    monkeypatch.setattr(LazyEngine, "_build", counting)
    threads = [
        threading.Thread(target=chat.invoke, args=(PROMPT,), kwargs={"max_tokens": 2}) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1]


def test_instances_naming_the_same_models_share_them(
    monkeypatch: pytest.MonkeyPatch, target: Any, tokenizer: Any
) -> None:
    loads: list[str] = []

    def fake_get_model(name: str, **kwargs: Any) -> tuple[Any, Any]:
        loads.append(name)
        return target, tokenizer

    monkeypatch.setattr("spec_rag.models.get_model", fake_get_model)
    answers = [
        ChatSpecKV(model="smollm2-135m-instruct", method="snapkv", max_tokens=4).invoke(PROMPT).content
        for _ in range(2)
    ]
    assert answers[0] == answers[1]
    assert loads == ["smollm2-135m-instruct", "smollm2-135m-instruct"], (
        "each instance asks the shared cache; the cache decides what to load"
    )


def _same_models(chat: ChatSpecKV) -> dict[str, Any]:
    return {
        "llm": chat.llm,
        "tokenizer": chat.tokenizer,
        "draft_model": chat.draft_model,
        "draft_tokenizer": chat.draft_tokenizer,
        "max_capacity_prompt": chat.max_capacity_prompt,
        "window_size": chat.window_size,
        "max_tokens": chat.max_tokens,
    }


# -- the size ceiling ---------------------------------------------------------------------------


def test_max_input_tokens_refuses_a_long_prompt_and_the_next_request_is_answered(
    target: Any, tokenizer: Any, draft: Any
) -> None:
    chat = ChatSpecKV(
        llm=target,
        tokenizer=tokenizer,
        draft_model=draft,
        draft_tokenizer=tokenizer,
        max_capacity_prompt=64,
        window_size=8,
        max_tokens=12,
        max_input_tokens=100,
    )
    with pytest.raises(InputTooLargeError, match=r"more than max_input_tokens \(100\)"):
        chat.invoke(LONG_PROMPT)
    assert chat.invoke(PROMPT).content == _engine_answer(target, tokenizer, draft, PROMPT)
    # Unset beside an engine, the engine's own ceiling holds; set, it replaces it.
    engine = SpecEngine(target, tokenizer, draft, tokenizer, SpecKVConfig(), max_input_tokens=100)
    assert ChatSpecKV(engine=engine).max_input_tokens == 100
    with pytest.raises(InputTooLargeError):
        ChatSpecKV(engine=engine, max_tokens=2).invoke(LONG_PROMPT)
    assert (
        ChatSpecKV(engine=engine, max_input_tokens=None, max_tokens=2).invoke(LONG_PROMPT).content is not None
    )


# -- chunked prefill ----------------------------------------------------------------------------


def test_prefill_chunk_size_chunks_the_targets_prefill_and_keeps_the_answer(
    target: Any, tokenizer: Any, layer_reads: Any
) -> None:
    calls = layer_reads(target)
    whole = ChatSpecKV(llm=target, tokenizer=tokenizer, method="full", max_tokens=6, prefill_chunk_size=None)
    expected = whole.invoke(LONG_PROMPT)
    assert max(calls) > 64  # the prompt is longer than the chunks below
    calls.clear()
    chunked = ChatSpecKV(llm=target, tokenizer=tokenizer, method="full", max_tokens=6, prefill_chunk_size=64)
    assert chunked.invoke(LONG_PROMPT).content == expected.content
    assert max(calls) <= 64
    # Unset beside an engine, the engine's own holds, under another method too.
    engine = SpecEngine(target, tokenizer, config=None, prefill_chunk_size=300)
    assert ChatSpecKV(engine=engine, method="snapkv").prefill_chunk_size == 300
    with pytest.raises(ValueError, match="greater than 0"):
        ChatSpecKV(llm=target, tokenizer=tokenizer, method="full", prefill_chunk_size=0)
