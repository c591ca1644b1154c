"""The framework-free adapter core: source rules, lazy engine, streams, token counts, SpecPC budgets."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from spec_rag import InvalidInputError, SpecEngine, SpecKVConfig, SpecPC, SpecPCConfig, adapters, method_info
from spec_rag.adapters import (
    DocumentCompressor,
    LazyEngine,
    draft_source,
    engine_source,
    in_threads,
    sampling_options,
)
from spec_rag.testing import AURORA_QUESTION, TOWN_DOCUMENTS

T, D = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"  # names that resolve offline
PROMPT = [{"role": "user", "content": "Tell me about the observatory. " * 4}]


# -- sources --------------------------------------------------------------------------------------


def test_nothing_given_is_the_default_pair() -> None:
    source = engine_source("X")
    assert (source.model, source.draft, source.method) == (
        adapters.DEFAULT_TARGET,
        adapters.DEFAULT_DRAFT,
        "speckv-pc",
    )
    # The default cascade keeps 2048 prompt tokens and half as many KV entries per head.
    assert (source.config.specpc.max_capacity_prompt, source.config.budget) == (2048, 1024)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": T}, "needs a draft model"),
        ({"model": T, "llm": object(), "tokenizer": object()}, "one target model, got model and llm"),
        ({"llm": object()}, "llm and tokenizer go together"),
        ({"model": T, "draft": D, "draft_model": object()}, "pass the draft once"),
        ({"model": T, "draft_tokenizer": object()}, "draft_tokenizer needs draft_model"),
        ({"model": T, "draft": D, "method": "magic"}, "unknown method"),
        ({"model": T, "draft": D, "method": "speckv", "fields": {"prompt_capacity": 9}}, "speckv-pc"),
        ({"model": T, "draft": D, "fields": {"prompt_capacity": 9}}, "window_size \\(64\\) is larger"),
        ({"model": T, "method": "snapkv", "fields": {"lookahead_tokens": 3}}, "no draft lookahead"),
        ({"model": T, "draft": D, "fields": {"max_capacity_prompt": 16}}, "Raise max_capacity_prompt"),
    ],
)
def test_bad_sources_fail_with_the_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_source("X", **kwargs)


@pytest.mark.parametrize("method", ["full", "snapkv", "streamingllm", "specpc", "speckv", "speckv-pc"])
def test_a_named_target_needs_a_draft_exactly_when_the_method_does(method: str) -> None:
    if method_info(method).needs_draft:
        with pytest.raises(ValueError, match="needs a draft"):
            engine_source("X", model=T, method=method)
    else:
        assert engine_source("X", model=T, method=method).draft is None


def test_method_fields_beside_an_engine_rerun_its_models(target: Any, tokenizer: Any, draft: Any) -> None:
    engine = SpecEngine(
        target, tokenizer, draft, tokenizer, SpecKVConfig(max_capacity_prompt=64, window_size=8)
    )
    assert engine_source("X", engine=engine).engine is engine
    source = engine_source("X", engine=engine, method="full")
    assert source.method == "full" and source.engine is not None and source.engine.target is target
    with pytest.raises(ValueError, match="already holds the models"):
        engine_source("X", engine=engine, draft=D)


def test_max_input_tokens_unset_keeps_the_given_engines_or_specpcs_own(
    target: Any, tokenizer: Any, draft: Any
) -> None:
    engine = SpecEngine(target, tokenizer, draft, tokenizer, SpecKVConfig(), max_input_tokens=50)
    kept = engine_source("X", engine=engine)
    assert kept.engine is engine and kept.max_input_tokens == 50
    lifted = engine_source("X", engine=engine, max_input_tokens=None).engine
    assert lifted is not None and lifted.max_input_tokens is None and lifted.config is engine.config
    assert engine_source("X", engine=engine, method="full").max_input_tokens == 50
    assert engine_source("X", model=T, draft=D).max_input_tokens == adapters.DEFAULT_MAX_INPUT_TOKENS
    specpc = SpecPC(draft, tokenizer, SpecPCConfig(), max_input_tokens=50)
    assert DocumentCompressor(draft_source("X", specpc=specpc)).get() is specpc
    rebuilt = DocumentCompressor(draft_source("X", specpc=specpc, max_input_tokens=80)).get()
    assert rebuilt is not specpc and rebuilt.max_input_tokens == 80


def test_prefill_chunk_size_unset_keeps_the_given_engines_or_specpcs_own(
    target: Any, tokenizer: Any, draft: Any
) -> None:
    engine = SpecEngine(target, tokenizer, draft, tokenizer, SpecKVConfig(), prefill_chunk_size=300)
    assert engine_source("X", engine=engine).engine is engine
    # Another method on the engine's models keeps its chunking (and its ceiling).
    rerun = engine_source("X", engine=engine, method="full")
    assert rerun.engine is not None and rerun.engine.method == "full"
    assert rerun.prefill_chunk_size == rerun.engine.prefill_chunk_size == 300
    one_pass = engine_source("X", engine=engine, prefill_chunk_size=None)
    assert one_pass.engine is not None and one_pass.engine.prefill_chunk_size is None
    assert one_pass.engine.config is engine.config
    # Models given as objects or names: the field, else the library's default.
    built = LazyEngine(
        engine_source("X", llm=target, tokenizer=tokenizer, method="full", prefill_chunk_size=64)
    )
    assert built.get().prefill_chunk_size == 64
    assert engine_source("X", model=T, draft=D).prefill_chunk_size == adapters.PREFILL_CHUNK_SIZE
    specpc = SpecPC(draft, tokenizer, SpecPCConfig(), prefill_chunk_size=300)
    assert DocumentCompressor(draft_source("X", specpc=specpc)).get() is specpc
    budget = DocumentCompressor(draft_source("X", specpc=specpc, fields={"max_capacity_prompt": 80})).get()
    assert budget is not specpc and budget.prefill_chunk_size == 300
    whole = DocumentCompressor(draft_source("X", specpc=specpc, prefill_chunk_size=None)).get()
    assert whole is not specpc and whole.prefill_chunk_size is None and whole.config == specpc.config
    loaded = draft_source("X", draft_model=draft, draft_tokenizer=tokenizer, prefill_chunk_size=64)
    assert DocumentCompressor(loaded).get().prefill_chunk_size == 64


def test_names_are_checked_at_one_call_site(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str | None, ...]] = []
    monkeypatch.setattr(adapters, "check_model_names", lambda *names: seen.append(names))
    engine_source("X", model=T, draft=D)
    draft_source("Y", draft=D)
    assert seen == [(T, D), (D,)]


# -- the lazy engine ------------------------------------------------------------------------------


def test_the_engine_is_built_once_across_threads(
    monkeypatch: pytest.MonkeyPatch, target: Any, tokenizer: Any
) -> None:
    calls: list[str] = []

    def slow_get_model(name: str, **kwargs: Any) -> tuple[Any, Any]:
        calls.append(name)
        time.sleep(0.2)  # a window in which a second thread could start a second build
        return target, tokenizer

    monkeypatch.setattr("spec_rag.models.get_model", slow_get_model)
    core = LazyEngine(engine_source("X", model="smollm2-135m-instruct", method="full"))
    assert core.loaded is None
    engines: list[SpecEngine] = []
    threads = [threading.Thread(target=lambda: engines.append(core.get())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["smollm2-135m-instruct"] and len({id(e) for e in engines}) == 1


def test_stream_folds_the_usage_into_the_last_text_chunk(target: Any, tokenizer: Any) -> None:
    core = LazyEngine(engine_source("X", llm=target, tokenizer=tokenizer, method="full"))
    options = sampling_options("X", {"max_new_tokens": 8}, {})
    deltas = list(core.stream(PROMPT, options))
    assert all(d.generation is None for d in deltas[:-1])
    last = deltas[-1].generation
    assert last is not None and deltas[-1].text != ""
    assert "".join(d.text for d in deltas) == last.text == core.generate(PROMPT, options).text
    assert adapters.usage(last)["completion_tokens"] == last.stats.output_tokens


def test_no_messages_is_said_so(target: Any, tokenizer: Any) -> None:
    core = LazyEngine(engine_source("Chat", llm=target, tokenizer=tokenizer, method="full"))
    with pytest.raises(InvalidInputError, match="Chat got no messages"):
        core.generate([], {})
    with pytest.raises(InvalidInputError, match="no messages"):
        core.stream([], {})


def test_unknown_call_options_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unsupported call options \['tools'\]"):
        sampling_options("X", {}, {"tools": []})
    assert sampling_options("X", {"max_new_tokens": 5, "stop": None}, {"max_tokens": 2, "stop": "a"}) == {
        "max_new_tokens": 2,
        "stop": ["a"],
    }


def test_token_counts_are_the_chat_template_the_engine_feeds(target: Any, tokenizer: Any) -> None:
    core = LazyEngine(engine_source("X", llm=target, tokenizer=tokenizer, method="full"))
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert core.count_tokens(PROMPT) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert core.count_tokens("hello world") == len(tokenizer.encode("hello world", add_special_tokens=False))
    assert core.count_tokens([]) == core.count_tokens("") == 0


async def test_in_threads_keeps_the_loop_free_and_closes_early() -> None:
    closed = threading.Event()

    def slow() -> Any:
        try:
            for i in range(100):
                time.sleep(0.02)
                yield i
        finally:
            closed.set()

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    items = in_threads(slow())
    got = [await items.__anext__() for _ in range(3)]
    await items.aclose()
    task.cancel()
    assert got == [0, 1, 2] and closed.is_set() and ticks > 3


# -- SpecPC over documents ------------------------------------------------------------------------


def test_draft_fields_override_the_base_config(draft: Any, tokenizer: Any) -> None:
    assert draft_source("X").draft == adapters.DEFAULT_DRAFT
    assert draft_source("X").config == SpecPCConfig(**adapters.SPLITTER_DEFAULTS)
    specpc = SpecPC(draft, tokenizer, SpecPCConfig(max_capacity_prompt=200, window_size=8))
    source = draft_source("X", specpc=specpc, fields={"kernel_size": 3})
    assert source.config == SpecPCConfig(max_capacity_prompt=200, window_size=8, kernel_size=3)
    with pytest.raises(ValueError, match="one draft, got draft and specpc"):
        draft_source("X", draft=D, specpc=specpc)
    with pytest.raises(ValueError, match="Raise max_capacity_prompt or lower window_size"):
        draft_source("X", fields={"max_capacity_prompt": 16, "window_size": 32})


def _compressor(draft: Any, tokenizer: Any) -> DocumentCompressor:
    fields = {"window_size": 8, "kernel_size": 5, "neighbor_tokens": 4}
    return DocumentCompressor(draft_source("X", draft_model=draft, draft_tokenizer=tokenizer, fields=fields))


def test_the_budget_counts_the_documents_tokens(draft: Any, tokenizer: Any) -> None:
    parts = _compressor(draft, tokenizer).compress(AURORA_QUESTION, TOWN_DOCUMENTS[:4], budget=64)
    assert sum(p.kept_tokens for p in parts) == 64  # instruction, headers and question come on top


def test_empty_documents_take_no_budget(draft: Any, tokenizer: Any) -> None:
    core = _compressor(draft, tokenizer)
    alone = core.compress(AURORA_QUESTION, TOWN_DOCUMENTS[:2], budget=48)
    mixed = core.compress(AURORA_QUESTION, ["", TOWN_DOCUMENTS[0], " \n ", TOWN_DOCUMENTS[1]], budget=48)
    assert [(p.text, p.kept_tokens) for p in alone] == [(p.text, p.kept_tokens) for p in (mixed[1], mixed[3])]
    assert [(p.index, p.text, p.original_tokens, p.kept_tokens) for p in (mixed[0], mixed[2])] == [
        (0, "", 0, 0),
        (2, " \n ", 0, 0),
    ]


def test_dropping_a_document_is_warned_once(
    draft: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    core = _compressor(draft, tokenizer)
    with caplog.at_level(logging.WARNING, logger="spec_rag.adapters"):
        core.compress(AURORA_QUESTION, TOWN_DOCUMENTS, budget=64)
        core.compress(AURORA_QUESTION, TOWN_DOCUMENTS, budget=64)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Raise max_capacity_prompt" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spec_rag.adapters"):
        _compressor(draft, tokenizer).compress(AURORA_QUESTION, ["", TOWN_DOCUMENTS[0]], budget=64)
    assert not caplog.records, "an empty document is not a dropped one"


def test_empty_query_names_the_owner(draft: Any, tokenizer: Any) -> None:
    with pytest.raises(InvalidInputError, match="X got an empty query"):
        _compressor(draft, tokenizer).compress("  ", TOWN_DOCUMENTS, budget=64)
