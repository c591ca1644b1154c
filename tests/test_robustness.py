"""Bad input gets a clear error or a sensible result; threads and streams do not interfere."""

from __future__ import annotations

import gc
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from spec_rag import (
    InvalidInputError,
    SpecEngine,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPC,
    SpecPCConfig,
)
from spec_rag.testing import NASTY_TEXTS

PC = SpecPCConfig(max_capacity_prompt=64, window_size=8, kernel_size=4, neighbor_tokens=4)
KV = SpecKVConfig(max_capacity_prompt=32, window_size=8)

any_text = st.one_of(st.sampled_from(NASTY_TEXTS), st.text(max_size=200))
settings_ = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def pc(draft, tokenizer):
    return SpecPC(draft, tokenizer, PC)


@settings_
@given(query=any_text, documents=st.lists(any_text, max_size=8))
def test_compress_documents_never_crashes_on_any_text(pc, query, documents):
    try:
        parts = pc.compress_documents(query, documents)
    except InvalidInputError as err:
        assert "query is empty" in str(err) or "leaves no room" in str(err)
        return
    assert [p.index for p in parts] == list(range(len(documents)))
    for part in parts:
        assert 0 <= part.kept_tokens <= part.original_tokens
        assert 0.0 <= part.score <= 1.0


@settings_
@given(prompt=any_text, max_new_tokens=st.integers(0, 4), stop=st.lists(st.text(max_size=3), max_size=2))
def test_engine_answers_or_refuses_any_text(target, draft, tokenizer, prompt, max_new_tokens, stop):
    engine = SpecEngine(target, tokenizer, draft=draft, config=KV)
    try:
        gen = engine.generate(prompt, max_new_tokens=max_new_tokens, stop=stop)
    except InvalidInputError as err:
        assert not prompt.strip() or "no tokens" in str(err)
        return
    assert len(gen.token_ids) <= max_new_tokens
    assert all(s not in gen.text for s in stop if s)


def test_a_hundred_tiny_documents_share_the_budget(pc):
    documents = [f"fact {i}: item {i} costs {i * 3} coins." for i in range(100)]
    parts = pc.compress_documents("What does item 17 cost?", documents, max_capacity_prompt=3000)
    assert len(parts) == 100
    assert sum(p.kept_tokens for p in parts) < sum(p.original_tokens for p in parts)


@pytest.mark.parametrize("budget", [0, 1, 7])
def test_budgets_below_the_window_are_refused(pc, budget, long_text):
    expected = "must be positive" if budget <= 0 else "smaller than window_size"
    with pytest.raises(InvalidInputError, match=expected):
        pc.compress(long_text, max_capacity_prompt=budget)


def test_budget_above_the_prompt_keeps_everything(pc):
    out = pc.compress("short prompt", max_capacity_prompt=10_000)
    assert out.compressed_tokens == out.original_tokens


def test_prompt_longer_than_the_drafts_context_is_scored_in_chunks_or_says_what_to_do(
    target, tokenizer, long_text
):
    short_draft = tiny_model("qwen2", tokenizer, max_position_embeddings=128)
    engine = SpecEngine(target, tokenizer, draft=short_draft, config=SpecKVPCConfig(specpc=PC, speckv=KV))
    out = engine.generate(long_text, max_new_tokens=2)
    assert out.stats.prompt_tokens > 128 and out.stats.target_prefill_tokens == 64
    # a lookahead (SpecKV's: the answer's length) that leaves a chunk no room is refused with the fix
    with pytest.raises(InvalidInputError, match=r"raise chunk_size .* or lower window_size or the lookahead"):
        engine.generate(long_text, max_new_tokens=200)


def test_a_stream_runs_in_the_consumers_thread_and_stops_when_closed(target, draft, tokenizer, long_text):
    engine = SpecEngine(target, tokenizer, draft=draft, config=KV)
    callers: list[int] = []  # the thread of every forward pass of either model
    hooks = [
        model.register_forward_pre_hook(lambda m, a: callers.append(threading.get_ident()))
        for model in (target, draft)
    ]
    try:
        stream = engine.stream(long_text, max_new_tokens=50)
        assert callers == []  # nothing runs before the consumer asks for text
        next(stream)
        assert callers and set(callers) == {threading.get_ident()}
        ran = len(callers)
        stream.close()
        del stream
        gc.collect()
        assert len(callers) == ran  # closing stopped it: no forward pass after close
        closed = engine.stream(long_text, max_new_tokens=3)
        closed.close()
        with pytest.raises(StopIteration):
            next(closed)
        assert len(callers) == ran
    finally:
        for hook in hooks:
            hook.remove()


def test_two_engines_with_different_models_do_not_disturb_each_other(tokenizer, long_text):
    first = SpecEngine(
        tiny_model("llama", tokenizer, seed=21),
        tokenizer,
        draft=tiny_model("llama", tokenizer, seed=22),
        config=KV,
    )
    second = SpecEngine(
        tiny_model("qwen3", tokenizer, seed=23),
        tokenizer,
        draft=tiny_model("qwen3", tokenizer, seed=24),
        config=KV,
    )
    prompts = [long_text[i * 200 : i * 200 + 900] for i in range(4)]
    alone = [
        (first.generate(p, max_new_tokens=6).text, second.generate(p, max_new_tokens=6).text) for p in prompts
    ]
    results: dict[tuple[int, int], str] = {}

    def run(which: int, engine: SpecEngine, i: int) -> None:
        results[(which, i)] = engine.generate(prompts[i], max_new_tokens=6).text

    threads = [
        threading.Thread(target=run, args=(w, e, i)) for i in range(4) for w, e in ((0, first), (1, second))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(results[(0, i)], results[(1, i)]) for i in range(4)] == alone
